"""Adaptive stopping for the sampling methods: stop drawing samples once the vote is settled.

Samples are launched in windows (so batches stay full) and checked after every reasoning step;
once the rule holds, the samples still running are released at once (their KV blocks freed) and
the method chooses among the finished ones.  Rules (the ``stop`` option):
- ``esc``: Early-Stopping Self-Consistency: stop after the first window whose samples all agree;
- ``beta``: Adaptive-Consistency: stop once the leading answer beats the runner-up with posterior
  probability >= ``stop_confidence`` (votes v1 >= v2: P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1));
- ``short_m``: launch the whole budget and stop when the first ``stop_m`` samples have finished;
- ``first_finish``: ``short_m`` with ``stop_m`` = 1;
- ``deepconf``: DeepConf online: a token's confidence is minus the mean log-probability of its top
  ``CONFIDENCE_TOP_K`` candidates, a sample's the lowest mean over ``CONFIDENCE_GROUP`` consecutive
  tokens.  A warm-up window runs in full and sets the threshold that keeps its ``stop_keep``
  most confident samples; the rest of the budget then runs at once, a sample whose last group
  falls below the threshold is dropped there, and the search stops once the leading answer holds
  ``stop_confidence`` of the confidence-weighted vote.  The vote is weighted by confidence.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from infera.scaling.answers import group_answers

STOPPING_RULES = ("esc", "beta", "short_m", "first_finish", "deepconf")
DEFAULT_WINDOWS = {"esc": 8, "beta": 4, "deepconf": 8}
CONFIDENCE_TOP_K = 5  # candidates whose log-probabilities make a token's confidence
CONFIDENCE_GROUP = 32  # tokens per sliding group


@functools.lru_cache(maxsize=4096)
def beta_confidence(v1: int, v2: int) -> float:
    """P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1): for integer parameters, P(Binomial(v1 + v2 + 1,
    1/2) <= v1)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, k) for k in range(v1 + 1)) / 2**n


def group_confidences(token_confidences: Sequence[float]) -> list[float]:
    """Means over every run of CONFIDENCE_GROUP consecutive tokens (one mean when shorter)."""
    n, g = len(token_confidences), CONFIDENCE_GROUP
    if n <= g:
        return [sum(token_confidences) / n] if n else []
    total = sum(token_confidences[:g])
    means = [total / g]
    for i in range(g, n):
        total += token_confidences[i] - token_confidences[i - g]
        means.append(total / g)
    return means


def trace_confidence(token_confidences: Sequence[float]) -> float:
    """A sample's confidence: its lowest group mean (0.0 without tokens)."""
    return min(group_confidences(token_confidences), default=0.0)


def _positive_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class StoppingRule:
    kind: str
    window: int | None = None  # samples launched together (deepconf: the warm-up); None: the whole budget
    confidence: float = 0.95
    m: int = 1
    keep: float = 0.9

    @classmethod
    def make(cls, kind: str | None, window: int | None = None, confidence: float = 0.95,
             m: int | None = None, keep: float | None = None) -> StoppingRule | None:
        """The rule named ``kind`` (None: no early stopping), its options checked (ValueError)."""
        if kind is None:
            if window is not None or m is not None or keep is not None:
                raise ValueError("stop_window, stop_m and stop_keep need a stop rule")
            return None
        if kind not in STOPPING_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOPPING_RULES)}, got {kind!r}")
        _positive_int("stop_window", window)
        _positive_int("stop_m", m)
        if not isinstance(confidence, (int, float)) or not 0.5 < confidence < 1:
            raise ValueError(f"stop_confidence must be in (0.5, 1), got {confidence!r}")
        if keep is not None and (kind != "deepconf" or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
            raise ValueError(f"stop_keep applies to deepconf and must be in (0, 1], got {keep!r}")
        if kind in ("short_m", "first_finish"):
            if window is not None:
                raise ValueError(f"{kind} launches the whole budget at once: stop_window does not apply")
            if kind == "first_finish" and m not in (None, 1):
                raise ValueError("first_finish stops at the first finished sample: use short_m for stop_m > 1")
            return cls(kind, None, confidence, m or 1)
        if m is not None:
            raise ValueError(f"stop_m applies to short_m, not {kind}")
        return cls(kind, window or DEFAULT_WINDOWS[kind], confidence, keep=0.9 if keep is None else keep)

    @property
    def needs_confidence(self) -> bool:
        return self.kind == "deepconf"

    def next_window(self, launched: int, budget: int) -> int:
        """How many samples to launch once none is running (0: the budget is spent)."""
        left = budget - launched
        if self.window is None or (self.kind == "deepconf" and launched > 0):
            return left
        return min(self.window, left)

    def width(self, budget: int) -> int:
        """The most samples running at once under this rule."""
        if self.window is None:
            return budget
        if self.kind == "deepconf":
            return max(min(self.window, budget), budget - self.window)
        return min(self.window, budget)

    def threshold(self, warmup: Sequence[float]) -> float | None:
        """deepconf: the confidence below which a later sample is dropped, from the warm-up samples'
        confidences (the ``keep`` most confident stay above it); None for the other rules."""
        if self.kind != "deepconf" or not warmup:
            return None
        ranked = sorted(warmup, reverse=True)
        return ranked[max(0, math.ceil(self.keep * len(ranked)) - 1)]

    def weights(self, confidences: Sequence[float]) -> list[float] | None:
        """The finished samples' vote weights (None: one vote each)."""
        return list(confidences) if self.kind == "deepconf" else None

    def settled(self, answers: Sequence[str | None], in_flight: int,
                confidences: Sequence[float] = ()) -> bool:
        """Whether the vote is decided, given the answers of the finished samples (in the order
        they finished; None: none extracted), their confidences (deepconf) and the number still
        running."""
        if self.kind in ("short_m", "first_finish"):
            return len(answers) >= self.m
        if self.kind == "esc":
            last = list(answers[-self.window:])
            return (in_flight == 0 and len(last) == self.window and None not in last
                    and len(group_answers(last)) == 1)
        groups = [g for g in group_answers(list(answers)) if answers[g[0]] is not None]
        if self.kind == "deepconf":
            if len(answers) < self.window:  # still warming up
                return False
            totals = [sum(confidences[i] for i in g) for g in groups]
            return bool(totals) and max(totals) >= self.confidence * sum(confidences)
        votes = sorted((len(g) for g in groups), reverse=True)
        return bool(votes) and beta_confidence(votes[0], votes[1] if len(votes) > 1 else 0) >= self.confidence
