"""A problem as the search sees it: the question (for rewards) and the prompt tokens (for the model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infera.loader.tokenizer import Tokenizer

DEFAULT_INSTRUCTION = "Think step by step, leaving a blank line between steps. Put the final answer in \\boxed{}."
JUDGE_QUESTION = "Is the solution above correct? Answer Yes or No."
_MARK = "\x00ANSWER\x00"

Prompt = str | list[dict[str, Any]] | list[int]


@dataclass
class Problem:
    question: str
    prompt_ids: list[int]
    messages: list[dict[str, Any]] | None = None  # the conversation the prompt renders (None: raw prompt)
    answer: str | None = None  # the reference answer, when known (evaluation)


def make_problem(tokenizer: Tokenizer, prompt: Prompt, instruction: str | None = DEFAULT_INSTRUCTION,
                 answer: str | None = None) -> Problem:
    """A question string becomes a user message (``instruction`` appended) under the model's chat
    template; a list of messages is rendered as given; token ids are used as they are."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if not tokenizer.hf.chat_template:
            text = f"{prompt}\n\n{instruction}\n\n" if instruction else f"{prompt}\n\n"
            return Problem(prompt, tokenizer.encode(text), None, answer)
        content = f"{prompt}\n\n{instruction}" if instruction else prompt
        messages = [{"role": "user", "content": content}]
        return Problem(prompt, tokenizer.apply_chat_template(messages), messages, answer)
    if prompt and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        question = users[-1] if users and isinstance(users[-1], str) else ""
        return Problem(question, tokenizer.apply_chat_template(list(prompt)), list(prompt), answer)
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
