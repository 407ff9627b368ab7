"""Summaries of a simulation: latency percentiles, throughput, goodput under an SLO, prefix hits, load
balance across replicas; a table comparing policies."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from infera.sim.simulator import SimResult

PERCENTILES = (50, 90, 99)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(np.asarray(values), PERCENTILES))}


def summarize(result: SimResult, slo_ttft: float, slo_itl: float) -> dict:
    """The figures of one run.  Goodput counts the finished requests with TTFT <= ``slo_ttft`` and
    mean inter-token latency <= ``slo_itl`` (seconds), per second of the run (first arrival to last
    finish).  The hit rate is the engines': prompt tokens found in the prefix cache when a request
    was first scheduled (host tier included: ``host_loaded_tokens`` of them came from there), over
    all prompt tokens."""
    served = [r for r in result.records if r.replica >= 0]
    done = [r for r in served if r.finish is not None]
    span = max((r.finish for r in done), default=0.0) - min((r.arrival for r in served), default=0.0)
    good = sum(1 for r in done if r.ttft <= slo_ttft and r.mean_itl <= slo_itl)
    output_tokens = sum(r.generated for r in served)
    prompt_tokens = sum(r.input_length for r in served)
    cached = sum(r.cached_tokens or 0 for r in served)
    per_replica = [{"requests": rep.num_requests, "output_tokens": rep.output_tokens, "steps": rep.num_steps,
                    "busy": rep.busy_time / span if span else 0.0, "preemptions": rep.scheduler.num_preemptions,
                    "host_loaded_blocks": rep.block_manager.num_loaded_blocks}
                   for rep in result.replicas]
    loads = np.array([p["requests"] for p in per_replica], dtype=float)
    return {
        "policy": result.policy,
        "replicas": len(result.replicas),
        "requests": len(result.records),
        "rejected": len(result.records) - len(served),
        "finished": len(done),
        "duration_s": span,
        "ttft_s": _percentiles([r.ttft for r in done]),
        "itl_s": _percentiles(result.itls),
        "throughput_tok_s": output_tokens / span if span else 0.0,
        "slo": {"ttft_s": slo_ttft, "mean_itl_s": slo_itl},
        "goodput_req_s": good / span if span else 0.0,
        "slo_met": good,
        "slo_attainment": good / len(done) if done else 0.0,
        "hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "router_hit_rate": result.router.hit_rate,
        "preemptions": sum(p["preemptions"] for p in per_replica),
        "host_loaded_tokens": sum(rep.block_manager.num_loaded_blocks * rep.block_manager.block_size
                                  for rep in result.replicas),
        "load_imbalance": float(loads.max() / loads.mean()) if loads.mean() else 0.0,  # max / mean requests
        "load_cv": float(loads.std() / loads.mean()) if loads.mean() else 0.0,
        "per_replica": per_replica,
        "sim_wall_s": result.wall_s,
    }


def table(summaries: Sequence[dict]) -> str:
    """One line per run."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    head = (f"{'policy':13s} {'repl':>4s} {'TTFT p50/p90/p99 ms':>22s} {'ITL p50/p90/p99 ms':>20s} "
            f"{'tok/s':>8s} {'goodput':>8s} {'SLO%':>5s} {'hit':>6s} {'imbal':>5s} {'preempt':>7s}")
    lines = [head]
    for s in summaries:
        t, i = s["ttft_s"], s["itl_s"]
        lines.append(f"{s['policy']:13s} {s['replicas']:4d} {'/'.join(ms(t[k]) for k in t):>22s} "
                     f"{'/'.join(ms(i[k]) for k in i):>20s} {s['throughput_tok_s']:8.0f} "
                     f"{s['goodput_req_s']:8.2f} {100 * s['slo_attainment']:5.1f} {100 * s['hit_rate']:5.1f}% "
                     f"{s['load_imbalance']:5.2f} {s['preemptions']:7d}")
    return "\n".join(lines)
