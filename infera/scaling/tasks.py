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


NAMES = ["Tom", "Sara", "Liam", "Mia", "Noah", "Emma", "Lucas", "Ava", "Omar", "Zoe", "Ben", "Lily"]
THINGS = ["apples", "books", "stickers", "marbles", "pencils", "cookies", "stamps", "coins", "cards", "shells"]


def _addition(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    verb = rng.choice(["buys", "finds", "gets"])
    return Task(f"{name} has {a} {thing} and {verb} {b} more. How many {thing} does {name} have now?", str(a + b))


def _subtraction(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(6, 20)
    b = rng.randint(2, a - 2)
    verb = rng.choice(["gives away", "sells", "loses"])
    return Task(f"{name} had {a} {thing} and {verb} {b} of them. How many {thing} does {name} have left?",
                str(a - b))


def _two_step(rng: random.Random) -> Task:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(6, 15)
    b = rng.randint(2, a - 2)
    c = rng.randint(2, 10)
    return Task(f"{name} has {a} {thing}. {name} gives {b} {thing} to a friend and then buys {c} more. "
                f"How many {thing} does {name} have now?", str(a - b + c))


KINDS = (_addition, _subtraction, _two_step)


def arithmetic_tasks(num: int, seed: int = 0) -> list[Task]:
    """``num`` word problems with small numbers (addition, subtraction, two steps, in turn) and
    their answers."""
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
        tasks.append(Task(item["question"], str(item["answer"])))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def load_tasks(spec: str, num: int | None = None, seed: int = 0) -> list[Task]:
    """``arithmetic`` (``num`` problems, default 200) or ``jsonl:FILE`` (the first ``num`` lines)."""
    if spec == "arithmetic":
        return arithmetic_tasks(num or 200, seed)
    if spec.startswith("jsonl:"):
        tasks = load_jsonl(spec.removeprefix("jsonl:"))
        return tasks[:num] if num else tasks
    raise ValueError(f"unknown task {spec!r}: use arithmetic or jsonl:FILE")
