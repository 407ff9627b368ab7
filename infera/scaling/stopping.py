"""Adaptive stopping for the sampling methods: stop drawing samples once the vote is settled.

Samples are launched in windows (so batches stay full) and checked after every reasoning step;
once the rule holds, the samples still running are released at once (their KV blocks freed) and
the method chooses among the finished ones.  Rules (the ``stop`` option):
- ``esc``: Early-Stopping Self-Consistency: stop after the first window whose samples all agree;
- ``beta``: Adaptive-Consistency: stop once the leading answer beats the runner-up with posterior
  probability >= ``stop_confidence`` (votes v1 >= v2: P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1));
- ``short_m``: launch the whole budget and stop when the first ``stop_m`` samples have finished;
- ``first_finish``: ``short_m`` with ``stop_m`` = 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from infera.scaling.answers import group_answers

STOPPING_RULES = ("esc", "beta", "short_m", "first_finish")
DEFAULT_WINDOWS = {"esc": 8, "beta": 4}


def beta_confidence(v1: int, v2: int) -> float:
    """P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1): for integer parameters, P(Binomial(v1 + v2 + 1,
    1/2) <= v1)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, k) for k in range(v1 + 1)) / 2**n


@dataclass(frozen=True)
class StoppingRule:
    kind: str
    window: int | None = None  # samples launched together; None: the whole budget at once
    confidence: float = 0.95
    m: int = 1

    @classmethod
    def make(cls, kind: str | None, window: int | None = None, confidence: float = 0.95,
             m: int | None = None) -> StoppingRule | None:
        """The rule named ``kind`` (None: no early stopping), its options checked (ValueError)."""
        if kind is None:
            if window is not None or m is not None:
                raise ValueError("stop_window and stop_m need a stop rule")
            return None
        if kind not in STOPPING_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOPPING_RULES)}, got {kind!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"stop_window must be a positive integer, got {window!r}")
        if not isinstance(confidence, (int, float)) or not 0.5 < confidence < 1:
            raise ValueError(f"stop_confidence must be in (0.5, 1), got {confidence!r}")
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"stop_m must be a positive integer, got {m!r}")
        if kind in ("short_m", "first_finish"):
            if window is not None:
                raise ValueError(f"{kind} launches the whole budget at once: stop_window does not apply")
            if kind == "first_finish" and m not in (None, 1):
                raise ValueError("first_finish stops at the first finished sample: use short_m for stop_m > 1")
            return cls(kind, None, confidence, m or 1)
        if m is not None:
            raise ValueError(f"stop_m applies to short_m, not {kind}")
        return cls(kind, window or DEFAULT_WINDOWS[kind], confidence)

    def settled(self, answers: Sequence[str | None], in_flight: int) -> bool:
        """Whether the vote is decided, given the answers of the finished samples (in the order
        they finished; None: none extracted) and the number still running."""
        if self.kind in ("short_m", "first_finish"):
            return len(answers) >= self.m
        if self.kind == "esc":
            last = list(answers[-self.window:])
            return (in_flight == 0 and len(last) == self.window and None not in last
                    and len(group_answers(last)) == 1)
        votes = sorted((len(g) for g in group_answers(list(answers)) if answers[g[0]] is not None), reverse=True)
        return bool(votes) and beta_confidence(votes[0], votes[1] if len(votes) > 1 else 0) >= self.confidence
