"""Cluster goodput scale study: the highest request rate at which 90% of the Mooncake conversation
trace's requests meet the SLO (DistServe's goodput), per routing policy at 8, 32 and 128 replicas.

The replicas are the scale study's (``benchmarks/cluster_sim.py``: Llama-3-8B bf16 on an H100 SXM
80 GB, the cost model ``roofline:llama-3-8b@h100-sxm``, 128-token KV blocks).  For each size and
policy :func:`infera.sim.goodput.max_goodput` replays the whole trace (12,031 requests) at a rate,
doubling or halving it until one probe meets the goal and one misses it, then bisecting until the
two are within the tolerance (5%); each size starts from the rate per replica the previous size
found for that policy (``--start-per-replica`` at the first).  About 40 simulations of 20-70 s.

    python benchmarks/cluster_goodput.py                    # docs/cluster_sim_goodput.json and .png
    python benchmarks/cluster_goodput.py --limit 2000 --replicas 8 --json /tmp/goodput.json --plot ''
    python benchmarks/cluster_goodput.py --replot docs/cluster_sim_goodput.json  # the PNG from saved results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cluster_sim import add_study_args, save_figure, study_options  # noqa: E402
from infera.sim.cost_model import load_cost_model  # noqa: E402
from infera.sim.goodput import goodput_table, max_goodput, trace_rate  # noqa: E402
from infera.sim.trace import read_mooncake  # noqa: E402

COLORS = {"round_robin": "tab:blue", "least_loaded": "tab:orange", "cache_aware": "tab:green",
          "longest_prefix": "tab:red"}
STYLES = (("o", "-"), ("s", "-."), ("^", ":"), ("D", "--"))  # marker, line per cluster size


def ratios(searches: list[dict]) -> dict[int, float]:
    """cache_aware's goodput over least_loaded's, per cluster size that ran both."""
    out = {}
    for n in sorted({g["replicas"] for g in searches}):
        by = {g["policy"]: g["rate_req_s"] for g in searches if g["replicas"] == n}
        if by.get("least_loaded") and "cache_aware" in by:
            out[n] = by["cache_aware"] / by["least_loaded"]
    return out


def plot(saved: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searches, goal = saved["goodput"], saved["goal"]
    sizes = sorted({g["replicas"] for g in searches})
    policies = [p for p in COLORS if any(g["policy"] == p for g in searches)]
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for g in searches:
        probes = sorted(g["probes"], key=lambda p: p["rate_req_s"])
        marker, line = STYLES[sizes.index(g["replicas"]) % len(STYLES)]
        curve.plot([p["rate_req_s"] / g["replicas"] for p in probes], [100 * p["attainment"] for p in probes],
                   marker=marker, ls=line, ms=4, color=COLORS[g["policy"]],
                   label=f"{g['policy']}, {g['replicas']} replicas")
    curve.axhline(100 * goal, color="gray", ls="--", lw=1.5, label=f"goal: {100 * goal:g}% meet the SLO")
    curve.set_xlabel("request rate per replica (req/s)")
    curve.set_ylabel("SLO attainment (%)")
    curve.set_title("SLO attainment at each rate probed", fontsize=10)
    curve.legend(fontsize=7, ncol=2)
    width = 0.8 / len(policies)
    for k, policy in enumerate(policies):
        by = {g["replicas"]: g["per_replica_req_s"] for g in searches if g["policy"] == policy}
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(sizes))]
        bars.bar(xs, [by.get(n, 0.0) for n in sizes], width, color=COLORS[policy], label=policy)
    for i, n in enumerate(sizes):
        if n in (r := ratios(searches)):
            top = max(g["per_replica_req_s"] for g in searches if g["replicas"] == n)
            bars.annotate(f"{r[n]:.2f}x", (i, top), ha="center", va="bottom", fontsize=9)
    bars.set_xticks(range(len(sizes)), [f"{n} replicas" for n in sizes])
    bars.set_ylabel("goodput per replica (req/s)")
    bars.set_title(f"goodput: the highest rate with >= {100 * goal:g}% meeting the SLO\n"
                   f"(above the bars: cache_aware / least_loaded)", fontsize=10)
    bars.legend(fontsize=8, loc="lower right")
    host = saved.get("kv_offloading_size_gb")
    save_figure(fig, f"Mooncake conversation trace ({saved['num_requests']:,} requests)"
                + (f", host KV tier {host:g} GB per replica" if host else ""), saved["slo"], path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="least_loaded,cache_aware", help="comma-separated")
    p.add_argument("--goal", type=float, default=0.9, help="the fraction of requests that must meet the SLO")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative gap between passing and failing rate")
    p.add_argument("--max-probes", type=int, default=10, help="simulations per search at most")
    p.add_argument("--step", type=float, default=2.0,
                   help="factor of the rate from probe to probe until one passes and one fails")
    p.add_argument("--start-per-replica", type=float, default=1.6,
                   help="the first probe's request rate per replica (req/s) at the first size")
    add_study_args(p, "cluster_sim_goodput")
    args = p.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot)
        return
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # not the schedulers' preemption warnings
    logging.getLogger("infera.sim.goodput").setLevel(logging.INFO)  # one line per probe

    model = load_cost_model(args.cost_model)
    limits = dataclasses.replace(model.replica, block_size=args.block_size)
    requests = read_mooncake(args.trace, args.limit)
    base = trace_rate(requests)
    started = time.perf_counter()
    searches = []
    start = dict.fromkeys(args.policies.split(","), args.start_per_replica)  # req/s per replica
    for n in (int(x) for x in args.replicas.split(",")):
        for policy in start:
            g = max_goodput(requests, n, policy, model, slo_ttft=args.slo_ttft, slo_itl=args.slo_itl, goal=args.goal,
                            start=start[policy] * n / base, step=args.step, tolerance=args.tolerance,
                            max_probes=args.max_probes, **study_options(args, limits))
            searches.append(g)
            print(goodput_table([g]), file=sys.stderr)
            if g.rate_req_s:
                start[policy] = g.per_replica
    print(goodput_table(searches))
    out = {"trace": args.trace, "num_requests": len(requests), "trace_rate_req_s": base, "goal": args.goal,
           "tolerance": args.tolerance, "step": args.step,
           "slo": {"ttft_s": args.slo_ttft, "mean_itl_s": args.slo_itl},
           "balance_abs_threshold": args.balance_abs_threshold, "cache_threshold": args.cache_threshold,
           "prefill_weight": args.prefill_weight, "kv_offloading_size_gb": args.kv_offloading_size,
           "kv_load_bandwidth_gb_s": args.kv_load_bandwidth, "cost_model": model.to_dict(),
           "replica": dataclasses.asdict(limits), "wall_s": time.perf_counter() - started,
           "goodput": [g.to_dict() for g in searches]}
    for n, r in ratios(out["goodput"]).items():
        print(f"{n:4d} replicas: cache_aware goodput / least_loaded = {r:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(out, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
