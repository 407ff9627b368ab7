"""A problem as the search sees it: the question (for rewards) and the prompt tokens (for the model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infera.loader.tokenizer import Tokenizer

DEFAULT_INSTRUCTION = "Think step by step, leaving a blank line between steps. Put the final answer in \\boxed{}."
JUDGE_QUESTION = "Is the solution above correct? Answer Yes or No."
PROMPT_OPTIONS = ("instruction", "examples")  # options of every method that shape the prompt
_MARK = "\x00ANSWER\x00"

Prompt = str | list[dict[str, Any]] | list[int]


@dataclass
class Problem:
    question: str
    prompt_ids: list[int]
    messages: list[dict[str, Any]] | None = None  # the conversation the prompt renders (None: raw prompt)
    answer: str | None = None  # the reference answer, when known (evaluation)


def check_examples(examples: Any) -> list[tuple[str, str]]:
    """Worked examples as (question, solution) string pairs; ValueError says what is wrong."""
    if not isinstance(examples, (list, tuple)) or not all(
            isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(x, str) and x.strip() for x in e)
            for e in examples):
        raise ValueError("examples must be a list of [question, solution] pairs of non-empty strings")
    return [(q, a) for q, a in examples]


def make_problem(tokenizer: Tokenizer, prompt: Prompt, instruction: str | None = DEFAULT_INSTRUCTION,
                 answer: str | None = None, examples: list[tuple[str, str]] = (),
                 rendered: list[int] | None = None) -> Problem:
    """A question string becomes a user message (``instruction`` appended) under the model's chat
    template, after ``examples`` (worked (question, solution) pairs, each a user turn answered by
    the assistant: few-shot prompting); a list of messages is rendered as given (or is ``rendered``
    already: the server renders templates in a sandboxed worker); token ids are used as they are."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        ask = (lambda q: f"{q}\n\n{instruction}") if instruction else (lambda q: q)
        if not tokenizer.hf.chat_template:
            shots = "".join(f"{ask(q)}\n\n{a}\n\n" for q, a in examples)
            return Problem(prompt, tokenizer.encode(f"{shots}{ask(prompt)}\n\n"), None, answer)
        messages = [m for q, a in examples for m in ({"role": "user", "content": ask(q)},
                                                     {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": ask(prompt)})
        return Problem(prompt, tokenizer.apply_chat_template(messages), messages, answer)
    if examples:
        raise ValueError("examples go before a question string; with chat messages, put them in the messages")
    if prompt and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        question = users[-1] if users and isinstance(users[-1], str) else ""
        ids = rendered if rendered is not None else tokenizer.apply_chat_template(list(prompt))
        return Problem(question, ids, list(prompt), answer)
    if prompt and all(isinstance(t, int) for t in prompt):
        return Problem(tokenizer.decode(list(prompt)), list(prompt), None, answer)
    raise ValueError("prompt must be a question string, a list of chat messages or a list of token ids")


def judge_suffix(tokenizer: Tokenizer, problem: Problem, question: str = JUDGE_QUESTION) -> list[int]:
    """Tokens that follow a (partial) solution to ask the model ``question`` about it: under the
    chat template, the end of the assistant turn, a user turn and the next assistant header."""
    if problem.messages is None:
        return tokenizer.encode(f"\n\n{question}\nAnswer:", add_special_tokens=False)
    conversation = [*problem.messages, {"role": "assistant", "content": _MARK}, {"role": "user", "content": question}]
    text = tokenizer.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text.split(_MARK, 1)[1], add_special_tokens=False)
