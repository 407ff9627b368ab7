"""How many tokens each sequence drafts: adaptive per sequence, and zero when drafting does not pay.

Each sequence keeps a decayed count of accepted and rejected drafts; its acceptance rate ``a``
(with a prior) says the ``j``-th draft token yields ``a**j`` expected tokens (the chain holds up to
it).  A step's target time is measured per number of tokens computed (:class:`StepCost`: the CPU
kernels take activation rows in groups of four, so time rises in steps, not in a line), plus the
proposer's draft passes, fitted online.  Draft tokens are handed out across the batch in order of
expected yield while they raise the step's expected tokens per second, so speculation turns itself
off when the batch is already large (each draft token costs nearly a full token of compute) or
acceptance is low, and comes back when that changes.  Evidence decays every step, so a sequence
that stopped drafting tries again later.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

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
    cost is convex on a CPU (flat while the weights stream for a few tokens, about a token's
    compute per token once the batch is large), so a line over all counts would price the
    marginal token of a 16-sequence step from steps of one token.  Elsewhere it is a linear fit
    over all counts."""

    BANDWIDTH = 0.5  # standard deviation of the nearness kernel, in log token-count ratio
    MIN_WEIGHT = 0.05  # a count's decayed weight below which it is forgotten (~60 steps unseen)

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
        line = self._local_line(tokens)
        if line is None:
            fixed, per_token = self.linear.fit()
            if fixed <= 0:
                fixed, per_token = 1.0, self.linear.prior_ratio
            line = fixed + per_token * tokens
        w = self.weight.get(tokens, 0.0)
        return (self.mean.get(tokens, 0.0) * w + line) / (w + 1)

    def _local_line(self, tokens: int) -> float | None:
        """The nearness-weighted line through the measured means at ``tokens``, or None while
        fewer than two distinct counts nearby carry weight (the slope is not identified)."""
        sw = sx = sy = sxx = sxy = 0.0
        counts = 0
        for n, w in self.weight.items():
            k = w * math.exp(-0.5 * (math.log(n / tokens) / self.BANDWIDTH) ** 2)
            if k < self.MIN_WEIGHT:
                continue
            counts += 1
            y = self.mean[n]
            sw, sx, sy, sxx, sxy = sw + k, sx + k * n, sy + k * y, sxx + k * n * n, sxy + k * n * y
        if counts < 2:
            return None
        mx, my = sx / sw, sy / sw
        var = sxx / sw - mx * mx
        if var <= 1e-9:
            return None
        slope = max((sxy / sw - mx * my) / var, 0.0)
        return max(my + slope * (tokens - mx), 0.0)


@dataclass
class SpecState:
    """``Sequence.spec_state``: decayed acceptance evidence and the proposer's own state."""

    accepted: float = 0.0
    rejected: float = 0.0
    proposer: Any = None


class SpecController:
    """``max_tokens``: most draft tokens per sequence and step.  ``prior``: the acceptance rate a
    sequence is assumed to have before (or long after) its drafts were verified; optimistic, so that
    new sequences try.  ``step_cost``: the target's step time against the tokens it computes."""

    def __init__(self, max_tokens: int, prior: float = 0.8, prior_weight: float = 1.0, decay: float = 0.98,
                 per_token_cost: float = 0.15):
        self.max_tokens = max_tokens
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self.step_cost = StepCost(per_token_cost)

    @staticmethod
    def state(seq: Sequence) -> SpecState:
        if seq.spec_state is None:
            seq.spec_state = SpecState()
        return seq.spec_state

    def acceptance(self, seq: Sequence) -> float:
        s = self.state(seq)
        return (s.accepted + self.prior * self.prior_weight) / (s.accepted + s.rejected + self.prior_weight)

    def update(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Evidence from one verification: ``num_accepted`` accepted in a row, then one rejection
        unless all ``num_drafted`` were accepted."""
        s = self.state(seq)
        s.accepted += num_accepted
        s.rejected += num_accepted < num_drafted

    def plan(self, seqs: list[Sequence], limits: list[int], base_tokens: int, base_yield: int,
             draft_cost: LinearCost | None) -> list[int]:
        """Draft tokens for each of ``seqs`` (at most ``limits[i]``) in a step that computes
        ``base_tokens`` tokens and yields ``base_yield`` tokens without drafts.  ``draft_cost``: the
        proposer's time per draft pass against the sequences in it (None: drafting is free)."""
        for seq in seqs:
            s = self.state(seq)
            s.accepted *= self.decay
            s.rejected *= self.decay
        step_cost = self.step_cost
        d_fixed, d_token = draft_cost.fit() if draft_cost is not None else (0.0, 0.0)
        if draft_cost is not None and not draft_cost.measured:  # until measured: a draft pass as half a step
            d_fixed, d_token = 0.5 * step_cost(1), 0.5 * (step_cost(2) - step_cost(1))
        rates = [self.acceptance(s) for s in seqs]
        ks = [0] * len(seqs)
        tokens = base_tokens
        target = step_cost(tokens)
        drafting = 0.0  # the draft passes' time
        expected = float(base_yield)
        depth = 0  # draft passes so far (each one's fixed cost is paid once for the batch)
        heap = [(-a, i, 1) for i, a in enumerate(rates) if limits[i] > 0]
        heapq.heapify(heap)
        while heap:
            neg_gain, i, j = heapq.heappop(heap)
            gain = -neg_gain
            longer = step_cost(tokens + 1)
            extra = longer - target + d_token + (d_fixed if j > depth else 0.0)
            if gain * (target + drafting) <= extra * expected:  # would lower expected tokens per second
                break
            expected, tokens, ks[i], depth = expected + gain, tokens + 1, j, max(depth, j)
            drafting += extra - (longer - target)
            target = longer
            if j < limits[i]:
                heapq.heappush(heap, (-gain * rates[i], i, j + 1))
        return ks
