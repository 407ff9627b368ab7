"""Choosing the final answer among finished branches: highest reward, majority vote, weighted vote."""
from __future__ import annotations

from collections.abc import Sequence

from infera.scaling.answers import group_answers

SELECT = ("argmax", "vote")  # a search's final choice: its best branch, or a vote weighted by reward


def check_select(select: str) -> None:
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")


def argmax(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> tuple[list[int], dict[str, float]]:
    """Sum ``weights`` (1 each by default) per distinct answer; return the indices of the
    candidates with the winning answer and every answer's total.  Missing answers never win unless
    no candidate has one; ties go to the answer seen first."""
    weights = [1.0] * len(answers) if weights is None else list(weights)
    groups = group_answers(list(answers))
    totals = [sum(weights[i] for i in g) for g in groups]
    answered = [k for k, g in enumerate(groups) if answers[g[0]] is not None]
    pool = answered or list(range(len(groups)))
    best = max(pool, key=lambda k: (totals[k], -k))
    return groups[best], {answers[g[0]]: t for g, t in zip(groups, totals) if answers[g[0]] is not None}
