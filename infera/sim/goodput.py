"""Goodput as DistServe (OSDI'24) defines it: the highest request rate at which at least a goal
fraction of the requests (90% by default) meet the SLO, TTFT and mean inter-token latency both.

The search replays one trace at different rates (its arrival times divided by a rate factor; the
whole trace each time) and assumes that SLO attainment falls as the rate rises.  From a starting
factor it multiplies or divides by ``step`` until one probe meets the goal and one misses it, then
bisects (geometrically) until the two are within ``tolerance`` of each other: the goodput is the
highest rate probed that met the goal, and the true one (if attainment is monotone) lies below the
lowest rate that missed it, at most ``tolerance`` higher.  Where attainment is not monotone (a
router that sends every request of a burst to one replica at low load does worse there than at a
higher rate) the search still ends on a passing rate with a failing one just above it, the crossing
it met first from its start, not necessarily the highest.  ``max_probes`` bounds the simulations
run; a search that hits it reports what it bracketed (:attr:`Goodput.converged` is False).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from infera.sim.cost_model import CostModel
from infera.sim.report import summarize
from infera.sim.simulator import Simulator
from infera.sim.trace import TraceRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One simulation of the trace at one rate."""

    rate_factor: float  # times the trace's own arrival rate
    rate_req_s: float  # requests per second: one over the mean gap between arrivals
    attainment: float  # requests meeting the SLO over all requests (a rejected one misses it)
    hit_rate: float  # the engines' prefix hit rate
    sim_wall_s: float


@dataclass
class Goodput:
    """The result of a search: the highest passing rate, the lowest failing one and every probe."""

    policy: str
    replicas: int
    goal: float
    tolerance: float
    probes: list[Probe] = field(default_factory=list)

    @property
    def rate_req_s(self) -> float:
        """The goodput: the highest rate probed whose attainment met the goal (0 if none did)."""
        return max((p.rate_req_s for p in self.probes if p.attainment >= self.goal), default=0.0)

    @property
    def per_replica(self) -> float:
        return self.rate_req_s / self.replicas

    @property
    def failed_req_s(self) -> float:
        """The lowest rate probed whose attainment missed the goal (inf if none); the search only probes
        between the highest passing and the lowest failing rate, so it is above the goodput."""
        return min((p.rate_req_s for p in self.probes if p.attainment < self.goal), default=math.inf)

    @property
    def converged(self) -> bool:
        """Whether a passing and a failing rate were found within the tolerance of each other."""
        return 0 < self.rate_req_s and self.failed_req_s <= self.rate_req_s * (1 + self.tolerance)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "replicas": self.replicas, "goal": self.goal, "tolerance": self.tolerance,
                "rate_req_s": self.rate_req_s, "per_replica_req_s": self.per_replica,
                "failed_req_s": None if math.isinf(self.failed_req_s) else self.failed_req_s,
                "converged": self.converged, "probes": [dataclasses.asdict(p) for p in self.probes]}


def trace_rate(requests: Sequence[TraceRequest]) -> float:
    """The trace's arrival rate: one over the mean gap between arrivals."""
    span = max(r.arrival for r in requests) - min(r.arrival for r in requests)
    if span <= 0:
        raise ValueError("the requests all arrive at one instant: the trace has no rate to scale")
    return (len(requests) - 1) / span


def at_rate(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """The trace replayed ``factor`` times as fast (arrival times divided by it)."""
    return [dataclasses.replace(r, arrival=r.arrival / factor) for r in requests]


def max_goodput(requests: Sequence[TraceRequest], num_replicas: int, policy: str, cost_model: CostModel, *,
                slo_ttft: float, slo_itl: float, goal: float = 0.9, start: float = 1.0, step: float = 2.0,
                tolerance: float = 0.05, max_probes: int = 16, **options) -> Goodput:
    """The highest rate at which at least ``goal`` of ``requests`` meet TTFT <= ``slo_ttft`` and mean
    inter-token latency <= ``slo_itl`` (seconds), searched from ``start`` times the trace's rate
    (``options``: the :class:`Simulator`'s: limits, router settings, seed, disaggregation, host tier)."""
    if not 0 < goal <= 1 or tolerance <= 0 or step <= 1 or start <= 0:
        raise ValueError("need 0 < goal <= 1, tolerance > 0, step > 1 and start > 0")
    base = trace_rate(requests)
    out = Goodput(policy, num_replicas, goal, tolerance)
    lo, hi = 0.0, math.inf  # the highest factor that met the goal, the lowest that missed it
    factor = start
    while len(out.probes) < max_probes:
        result = Simulator(at_rate(requests, factor), num_replicas, policy, cost_model, **options,
                           progress=False).run()
        s = summarize(result, slo_ttft, slo_itl)
        probe = Probe(factor, factor * base, s["slo_met"] / s["requests"], s["hit_rate"], result.wall_s)
        out.probes.append(probe)
        logger.info("%s, %d replicas: %.4g req/s (x%.4g the trace's): %.1f%% meet the SLO (%.0f s)", policy,
                    num_replicas, probe.rate_req_s, factor, 100 * probe.attainment, probe.sim_wall_s)
        if probe.attainment >= goal:
            lo = factor
        else:
            hi = factor
        if 0 < lo and hi <= lo * (1 + tolerance):
            break
        factor = factor * step if math.isinf(hi) else factor / step if lo == 0 else math.sqrt(lo * hi)
    return out


def goodput_table(results: Sequence[Goodput]) -> str:
    """One line per search."""
    head = (f"{'policy':13s} {'repl':>4s} {'goodput req/s':>13s} {'per replica':>11s} {'SLO% there':>10s} "
            f"{'fails at':>10s} {'probes':>6s}")
    lines = [head]
    for g in results:
        there = max((p for p in g.probes if p.attainment >= g.goal), key=lambda p: p.rate_req_s, default=None)
        fails = "-" if math.isinf(g.failed_req_s) else f"{g.failed_req_s:.4g}"
        lines.append(f"{g.policy:13s} {g.replicas:4d} {g.rate_req_s:13.4g} {g.per_replica:11.4g} "
                     f"{'-' if there is None else f'{100 * there.attainment:.1f}':>10s} {fails:>10s} "
                     f"{len(g.probes):6d}{'' if g.converged else '  (not converged)'}")
    return "\n".join(lines)
