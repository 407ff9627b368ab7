"""Task sets for ``infera eval``: the built-in ``arithmetic`` word problems and JSONL files."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Task:
    question: str
    answer: str
    solution: str | None = None  # a worked solution (steps a blank line apart), for few-shot examples


NAMES = ["Tom", "Sara", "Liam", "Mia", "Noah", "Emma", "Lucas", "Ava", "Omar", "Zoe", "Ben", "Lily"]
THINGS = ["apples", "books", "stickers", "marbles", "pencils", "cookies", "stamps", "coins", "cards", "shells"]


def _addition(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    verb = rng.choice(["buys", "finds", "gets"])
    return Task(f"{name} has {a} {thing} and {verb} {b} more. How many {thing} does {name} have now?", str(a + b),
                f"{name} has {a} {thing} and {verb} {b} more: {a} + {b} = {a + b}.\n\n"
                f"The answer is \\boxed{{{a + b}}}.")


def _subtraction(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(6, 20)
    b = rng.randint(2, a - 2)
    verb = rng.choice(["gives away", "sells", "loses"])
    return Task(f"{name} had {a} {thing} and {verb} {b} of them. How many {thing} does {name} have left?",
                str(a - b), f"{name} had {a} {thing} and {verb} {b}: {a} - {b} = {a - b}.\n\n"
                            f"The answer is \\boxed{{{a - b}}}.")


def _two_step(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(6, 15)
    b = rng.randint(2, a - 2)
    c = rng.randint(2, 10)
    return Task(f"{name} has {a} {thing}. {name} gives {b} {thing} to a friend and then buys {c} more. "
                f"How many {thing} does {name} have now?", str(a - b + c),
                f"After giving {b} {thing} away, {name} has {a} - {b} = {a - b}.\n\n"
                f"After buying {c} more, {name} has {a - b} + {c} = {a - b + c}.\n\n"
                f"The answer is \\boxed{{{a - b + c}}}.")


KINDS = (_addition, _subtraction, _two_step)


def arithmetic_tasks(num: int, seed: int | str = 0) -> list[Task]:
    """``num`` word problems with small numbers (addition, subtraction, two steps, in turn), their
    answers and worked solutions."""
    if num < 1:
        raise ValueError(f"the number of problems must be >= 1, got {num}")
    rng = random.Random(seed)
    return [KINDS[i % len(KINDS)](rng) for i in range(num)]


def load_jsonl(path: str | Path) -> list[Task]:
    """One ``{"question": ..., "answer": ...}`` object per line (blank lines skipped)."""
    path = Path(path)
    tasks = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read task file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or "answer" not in item:
            raise ValueError(f'{path}:{number}: expected an object with "question" (a string) and "answer"')
        solution = item.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise ValueError(f'{path}:{number}: "solution" must be a string')
        tasks.append(Task(item["question"], str(item["answer"]), solution))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def load_tasks(spec: str, num: int | None = None, seed: int = 0,
               num_examples: int = 0) -> tuple[list[Task], list[tuple[str, str]]]:
    """The problems of ``arithmetic`` (``num`` of them, default 200) or ``jsonl:FILE`` (the first
    ``num`` lines), and ``num_examples`` worked (question, solution) examples for few-shot
    prompts: for ``arithmetic`` more generated problems (another seed, none among the problems),
    for a JSONL file its first lines that carry a "solution" (then left out of the problems)."""
    if num_examples < 0:
        raise ValueError(f"the number of examples must be >= 0, got {num_examples}")
    if spec == "arithmetic":
        tasks = arithmetic_tasks(num or 200, seed)
        asked = {t.question for t in tasks}
        pool = arithmetic_tasks(num_examples + len(asked), f"examples-{seed}") if num_examples else []
        examples = [t for t in pool if t.question not in asked][:num_examples]
    elif spec.startswith("jsonl:"):
        tasks = load_jsonl(spec.removeprefix("jsonl:"))
        examples = [t for t in tasks if t.solution][:num_examples]
        if len(examples) < num_examples:
            raise ValueError(f"{spec}: {num_examples} examples asked for, but only {len(examples)} lines have a "
                             f'"solution"')
        tasks = [t for t in tasks if t not in examples]
        tasks = tasks[:num] if num else tasks
    else:
        raise ValueError(f"unknown task {spec!r}: use arithmetic or jsonl:FILE")
    return tasks, [(t.question, t.solution) for t in examples]
