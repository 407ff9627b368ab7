"""How many tokens each sequence drafts: adaptive per sequence, and zero when drafting does not pay.

Each sequence keeps a decayed count of accepted and rejected drafts; its acceptance rate ``a``
says the ``j``-th draft token yields ``a**j`` expected tokens (the chain holds up to it).  Its
prior is the rate of all sequences' recent drafts (itself starting from an optimistic prior), so a
new sequence expects what the proposer achieves on the current workload, and a sequence whose own
evidence has decayed retries only where the workload's drafts would pay.  A step's target time is
measured per number of tokens computed (:class:`StepCost`: the CPU kernels take activation rows in
groups of four, so time rises in steps, not in a line), plus the proposer's draft passes, fitted
online.  Draft tokens are ranked across the batch by expected yield, and the step takes the number
of them, in that order, that maximizes its expected tokens per second (not only while each one
raises it: a group of four rows, or a wider kernel path such as AMX from 32 rows, can make a few
more tokens cheaper than one more), so speculation turns itself off when the batch is already
large (each draft token costs nearly a full token of compute) or acceptance is low, and comes back
when that changes.  Evidence decays every step, so a sequence that stopped drafting tries again
later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence


class LinearCost:
    """Online least-squares fit of ``seconds = fixed + per_item * items`` with exponential forgetting;
    the per-item slope is pulled toward ``prior_ratio * fixed`` while the items seen vary little."""

    def __init__(self, prior_ratio: float, decay: float = 0.98, prior_weight: float = 20.0):
        self.prior_ratio = prior_ratio
        self.decay = decay
        self.prior_weight = prior_weight
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, items: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + items, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + items * items, d * self.sxy + items * seconds

    @property
    def measured(self) -> bool:
        return self.n > 0

    def fit(self) -> tuple[float, float]:
        """(fixed, per_item) seconds; (0, 0) before any measurement."""
        if not self.n:
            return 0.0, 0.0
        mx, my = self.sx / self.n, self.sy / self.n
        var = max(self.sxx / self.n - mx * mx, 0.0) * self.n
        cov = (self.sxy / self.n - mx * my) * self.n
        # ridge toward the prior ratio: slope = ratio * intercept, intercept = my - slope * mx
        prior_slope = self.prior_ratio * my / (1 + self.prior_ratio * mx)
        slope = max((cov + self.prior_weight * prior_slope) / (var + self.prior_weight), 0.0)
        fixed = my - slope * mx
        if fixed <= 0:  # the data says nothing sensible: fall back on the prior ratio
            slope, fixed = prior_slope, my - prior_slope * mx
        return fixed, slope


class StepCost:
    """Step time against the tokens it computes: a decayed mean per token count where measured,
    blended with a line.  Where several token counts near the one asked about were measured, the
    line is fitted to their means, each weighted by its nearness (in ratio of token counts): the
    cost is far from a line on a CPU (flat while the weights stream for a few tokens, about a
    token's compute per token once the batch is large, cheaper per token again where the AMX
    kernels take over), so a line over all counts would price the marginal token of a
    16-sequence step from steps of one token.  Elsewhere it is a linear fit
    over all counts."""

    BANDWIDTH = 0.5  # standard deviation of the nearness kernel, in log token-count ratio
    MIN_WEIGHT = 0.05  # a count's decayed weight below which it is forgotten (~60 steps unseen)
    MIN_SECONDS = 1e-6  # a line extrapolated below zero still prices a step

    def __init__(self, prior_ratio: float, decay: float = 0.95):
        self.linear = LinearCost(prior_ratio)
        self.decay = decay
        self.mean: dict[int, float] = {}
        self.weight: dict[int, float] = {}

    def add(self, tokens: int, seconds: float) -> None:
        self.linear.add(tokens, seconds)
        for n in list(self.weight):  # the state stays bounded by the counts seen lately
            self.weight[n] *= self.decay
            if self.weight[n] < self.MIN_WEIGHT:
                del self.weight[n], self.mean[n]
        w = self.weight.get(tokens, 0.0)
        self.mean[tokens] = (self.mean.get(tokens, 0.0) * w + seconds) / (w + 1)
        self.weight[tokens] = w + 1

    def __call__(self, tokens: int) -> float:
        """Expected seconds of a step computing ``tokens`` tokens (a unit step before any measurement)."""
        return float(self.curve(tokens, tokens)[0])

    def curve(self, lo: int, hi: int) -> np.ndarray:
        """Expected seconds of steps computing ``lo``, ``lo + 1``, ..., ``hi`` tokens: the measured
        mean where there is one, blended with the nearness-weighted line through the means near each
        count (where fewer than two counts nearby carry weight, the slope is not identified and the
        linear fit over all counts stands in)."""
        t = np.arange(max(lo, 1), max(hi, lo, 1) + 1, dtype=np.float64)
        fixed, per_token = self.linear.fit()
        if fixed <= 0:
            fixed, per_token = 1.0, self.linear.prior_ratio
        line = fixed + per_token * t
        if not self.weight:
            return line
        n = np.fromiter(self.weight, np.float64, len(self.weight))
        w = np.fromiter(self.weight.values(), np.float64, len(self.weight))
        y = np.fromiter((self.mean[c] for c in self.weight), np.float64, len(self.weight))
        k = w * np.exp(-0.5 * (np.log(n / t[:, None]) / self.BANDWIDTH) ** 2)  # [counts asked, counts measured]
        k[k < self.MIN_WEIGHT] = 0.0
        sw = k.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mx, my = (k @ n) / sw, (k @ y) / sw
            var = (k @ (n * n)) / sw - mx * mx
            slope = np.maximum(((k @ (n * y)) / sw - mx * my) / var, 0.0)
            local = np.maximum(my + slope * (t - mx), 0.0)
        identified = ((k > 0).sum(axis=1) >= 2) & (var > 1e-9)
        line = np.where(identified, local, line)
        w_t, mean_t = np.zeros_like(t), np.zeros_like(t)  # the measured means at the counts asked
        here = (n >= t[0]) & (n <= t[-1])
        at = (n[here] - t[0]).astype(np.int64)
        w_t[at], mean_t[at] = w[here], y[here]
        return np.maximum((mean_t * w_t + line) / (w_t + 1), self.MIN_SECONDS)


@dataclass
class SpecState:
    """``Sequence.spec_state``: decayed acceptance evidence and the proposer's own state."""

    accepted: float = 0.0
    rejected: float = 0.0
    proposer: Any = None


class SpecController:
    """``max_tokens``: most draft tokens per sequence and step.  ``prior``: the acceptance rate
    assumed before any draft was verified; optimistic, so that drafting is tried.  ``step_cost``:
    the target's step time against the tokens it computes."""

    def __init__(self, max_tokens: int, prior: float = 0.8, prior_weight: float = 1.0, decay: float = 0.98,
                 per_token_cost: float = 0.15):
        self.max_tokens = max_tokens
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self.step_cost = StepCost(per_token_cost)
        self.overall = SpecState()  # all sequences' decayed evidence: each sequence's prior

    @staticmethod
    def state(seq: Sequence) -> SpecState:
        if seq.spec_state is None:
            seq.spec_state = SpecState()
        return seq.spec_state

    def acceptance(self, seq: Sequence) -> float:
        return self._rate(self.state(seq), self._rate(self.overall, self.prior))

    def _rate(self, s: SpecState, prior: float) -> float:
        return (s.accepted + prior * self.prior_weight) / (s.accepted + s.rejected + self.prior_weight)

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Evidence from one verification: ``num_accepted`` accepted in a row, then one rejection
        unless all ``num_drafted`` were accepted."""
        for s in (self.state(seq), self.overall):
            s.accepted += num_accepted
            s.rejected += num_accepted < num_drafted

    def plan(self, seqs: list[Sequence], limits: list[int], base_tokens: int, base_yield: int,
             draft_cost: LinearCost | None) -> list[int]:
        """Draft tokens for each of ``seqs`` (at most ``limits[i]``) in a step that computes
        ``base_tokens`` tokens and yields ``base_yield`` tokens without drafts.  ``draft_cost``: the
        proposer's time per draft pass against the sequences in it (None: drafting is free)."""
        for s in (*map(self.state, seqs), self.overall):
            s.accepted *= self.decay
            s.rejected *= self.decay
        step_cost = self.step_cost
        d_fixed, d_token = draft_cost.fit() if draft_cost is not None else (0.0, 0.0)
        if draft_cost is not None and not draft_cost.measured:  # until measured: a draft pass as half a step
            d_fixed, d_token = 0.5 * step_cost(1), 0.5 * (step_cost(2) - step_cost(1))
        rates = np.array([self.acceptance(s) for s in seqs])
        counts = np.asarray(limits, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return [0] * len(seqs)
        # every draft token a step could verify: its sequence, its place in the chain, its expected yield
        owner = np.repeat(np.arange(len(seqs)), counts)
        depth = np.arange(1, total + 1) - np.repeat(np.cumsum(counts) - counts, counts)
        gain = rates[owner] ** depth
        order = np.lexsort((depth, owner, -gain))  # by expected yield (each chain stays in order)
        expected = base_yield + np.cumsum(gain[order])
        # each draft pass's fixed cost is paid once for the batch: once per chain depth reached
        drafting = d_token * np.arange(1, total + 1) + d_fixed * np.maximum.accumulate(depth[order])
        target = step_cost.curve(base_tokens, base_tokens + total)  # by draft tokens added
        rate = np.concatenate(([base_yield / target[0]], expected / (target[1:] + drafting)))
        best = int(np.argmax(rate))  # the first of equal rates: the fewest draft tokens
        return np.bincount(owner[order[:best]], minlength=len(seqs)).tolist()
