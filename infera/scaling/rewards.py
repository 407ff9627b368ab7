"""Rewards: one interface over verifiers, the model judging itself and reward models.

``Reward.score(search, branches)`` returns, for each branch, the scores (in [0, 1]) it earns
now: a *process* reward scores every step that has no score yet, each given the steps before
it; an *outcome* reward scores the solution so far once.  A search keeps each branch's scores
and aggregates them (last, min or product).  A reward that needs the served model returns a
generator that yields engine operations (see :mod:`infera.scaling.controller`).

Sources: a Python callable, the built-in arithmetic checker, the served model's probability of
"Yes" after a correctness question (self-judging), and a PRM/ORM from an HF directory
(:mod:`infera.scaling.reward_model`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from infera.scaling.arithmetic_checker import step_score

if TYPE_CHECKING:
    from infera.scaling.search import Branch, Search

Scores = list[list[float]]


class Reward(ABC):
    aggregate = "last"  # how a search combines this reward's scores by default

    @abstractmethod
    def score(self, search: Search, branches: list[Branch]) -> Scores | Generator[Any, Any, Scores]:
        """New scores for each branch (see the module docstring)."""


def _checked(value: Any, source: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} returned {value!r}; rewards must be numbers in [0, 1]") from None
    if not 0.0 <= x <= 1.0 or math.isnan(x):
        raise ValueError(f"{source} returned {x}; rewards must be in [0, 1]")
    return x


class FunctionReward(Reward):
    """``fn(question, steps)`` -> a number in [0, 1] (an outcome score of the steps so far) or a
    list with one number per step (process scores)."""

    def __init__(self, fn: Callable[[str, list[str]], float | list[float]], aggregate: str = "last"):
        self.fn = fn
        self.aggregate = aggregate
        self.name = getattr(fn, "__name__", "reward function")

    def score(self, search: Search, branches: list[Branch]) -> Scores:
        out = []
        for b in branches:
            value = self.fn(search.problem.question, list(b.steps))
            if isinstance(value, (list, tuple)):
                if len(value) != len(b.steps):
                    raise ValueError(f"{self.name} returned {len(value)} step scores for {len(b.steps)} steps")
                out.append([_checked(v, self.name) for v in value[b.num_scored_steps:]])
            else:
                out.append([_checked(value, self.name)])
        return out


class ArithmeticReward(Reward):
    """Process reward from the built-in checker: a step's score is the fraction of its
    ``a op b = c`` claims that hold (1 when it claims nothing)."""

    aggregate = "min"

    def score(self, search: Search, branches: list[Branch]) -> Scores:
        return [[step_score(step) for step in b.steps[b.num_scored_steps:]] for b in branches]


class SelfJudgeReward(Reward):
    """The served model judges the solution so far: P("Yes") / (P("Yes") + P("No")) for its next
    token after a correctness question.  One prefill-only pass per branch, which shares the
    branch's KV blocks, so only the question is computed."""

    def __init__(self) -> None:
        self._words: dict[int, str] = {}

    def score(self, search: Search, branches: list[Branch]) -> Generator[Any, Any, Scores]:
        tops = yield from search.judge(branches)
        tokenizer = search.controller.engine.tokenizer
        return [[self.p_yes(top, tokenizer)] for top in tops]

    def p_yes(self, top: list[tuple[int, float]], tokenizer: Any) -> float:
        mass = {"yes": 0.0, "no": 0.0}
        for token_id, logprob in dict(top).items():
            word = self._words.get(token_id)
            if word is None:
                word = self._words[token_id] = tokenizer.decode([token_id]).strip().lower()
            if word in mass:
                mass[word] += math.exp(logprob)
        total = mass["yes"] + mass["no"]
        return mass["yes"] / total if total > 0 else 0.5


REWARD_SOURCES = ("arithmetic", "self", "model:PATH", "a Python callable")


def make_reward(spec: Reward | Callable | str | None) -> Reward | None:
    """A reward from its spec: a Reward, a callable, ``"arithmetic"``, ``"self"`` (self-judging)
    or ``"model:PATH"`` (a PRM/ORM directory); None means no reward."""
    if spec is None or isinstance(spec, Reward):
        return spec
    if callable(spec):
        return FunctionReward(spec)
    if spec == "arithmetic":
        return ArithmeticReward()
    if spec in ("self", "self_judge"):
        return SelfJudgeReward()
    if isinstance(spec, str) and spec.startswith("model:"):
        from infera.scaling.reward_model import load_reward_model

        return load_reward_model(spec.removeprefix("model:"))
    raise ValueError(f"unknown reward source {spec!r}; use {', '.join(REWARD_SOURCES)}")
