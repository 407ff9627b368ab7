"""Cluster simulation scale study: the Mooncake conversation trace through 8, 32 and 128 simulated
replicas under each routing policy (round_robin, least_loaded, cache_aware).

Each replica models Llama-3-8B in bf16 on an H100 SXM 80 GB (the default cost model
``roofline:llama-3-8b@h100-sxm``: step times fitted to infera's roofline of that model on that
GPU; KV cache what 95% of 80 GB leaves after 16 GB of weights, 128 KiB per token, about 457k
tokens; up to 8192 tokens and 256 sequences per step).  The load per replica is kept the same at
every cluster size: arrival times are multiplied by ``--time-scale`` at 8 replicas (default 0.2:
8 replicas near their capacity) and by ``time_scale * 8 / replicas`` beyond, so 128 replicas see
16 times the request rate of 8.  The whole trace (12,031 requests) is simulated each time.

    python benchmarks/cluster_sim.py                                  # docs/cluster_sim.json and .png
    python benchmarks/cluster_sim.py --time-scale 0.15 --json docs/cluster_sim_t0.15.json \
        --plot docs/cluster_sim_t0.15.png                             # past capacity
    python benchmarks/cluster_sim.py --limit 2000 --replicas 8 --json /tmp/sim.json --plot ''
    python benchmarks/cluster_sim.py --replot docs/cluster_sim.json             # the PNG from saved results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from infera.router import DEFAULT_CACHE_THRESHOLD, DEFAULT_PREFILL_WEIGHT, POLICIES
from infera.sim.command import DEFAULT_COST_MODEL, add_kv_offload_args, kv_offload_options
from infera.sim.cost_model import load_cost_model
from infera.sim.report import summarize, table
from infera.sim.simulator import Simulator
from infera.sim.trace import ideal_hit_rate, read_mooncake

ROOT = Path(__file__).resolve().parent.parent
TRACE = Path("/work/shared/data/traces/mooncake_conversation_trace.jsonl")


def add_study_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options the scale studies share (the trace, the replicas, the SLO, where results go);
    ``name``: the docs/ file stem of the results."""
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--limit", type=int, default=None, help="only the first N requests of the trace")
    p.add_argument("--replicas", default="8,32,128", help="cluster sizes, comma-separated")
    p.add_argument("--cost-model", default=DEFAULT_COST_MODEL)
    p.add_argument("--block-size", type=int, default=128,
                   help="the replicas' KV block size (a trace block is 512 tokens: hits are the same for any "
                        "divisor; larger blocks simulate faster)")
    p.add_argument("--balance-abs-threshold", type=int, default=None, help="longest_prefix (default: the router's)")
    p.add_argument("--cache-threshold", type=float, default=DEFAULT_CACHE_THRESHOLD,
                   help="longest_prefix: the share of a prompt's blocks the best-matching replica must hold")
    p.add_argument("--prefill-weight", type=float, default=DEFAULT_PREFILL_WEIGHT,
                   help="cache_aware: the weight of the prompt blocks a replica would prefill against its load")
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-itl", type=float, default=0.1)
    add_kv_offload_args(p)
    p.add_argument("--json", default=str(ROOT / "docs" / f"{name}.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / f"{name}.png"), help="'' for none")
    p.add_argument("--replot", metavar="FILE.json", default=None, help="only plot the results saved in FILE.json")


def study_options(args: argparse.Namespace, limits) -> dict:
    """The :class:`Simulator` options of :func:`add_study_args`' flags (the replicas, the router, the host tier)."""
    return {"limits": limits, "balance_abs_threshold": args.balance_abs_threshold,
            "cache_threshold": args.cache_threshold, "prefill_weight": args.prefill_weight,
            **kv_offload_options(args, limits)}


def save_figure(fig, trace: str, slo: dict, path: str) -> None:
    """The studies' title (trace, replica model, SLO) on ``fig``, saved as ``path``."""
    fig.suptitle(f"{trace}, Llama-3-8B on H100 per replica; SLO TTFT <= {slo['ttft_s']:g} s, "
                 f"mean ITL <= {slo['mean_itl_s'] * 1000:g} ms", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(runs: list[dict], ideal: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["replicas"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(POLICIES)
    panels = [("goodput_req_s", "goodput per replica (requests/s meeting the SLO)", 1),
              ("hit_rate", "prefix hit rate (engine-side, % of prompt tokens)", 100),
              ("ttft_p50", "TTFT p50 (s, log scale)", 1)]
    for ax, (key, title, scale) in zip(axes, panels):
        for k, policy in enumerate(POLICIES):
            by_size = {r["replicas"]: r for r in runs if r["policy"] == policy}
            values = [by_size[n]["ttft_s"]["p50"] if key == "ttft_p50" else by_size[n][key] * scale for n in sizes]
            if key == "goodput_req_s":
                values = [v / n for v, n in zip(values, sizes)]
            ax.bar([i + (k - (len(POLICIES) - 1) / 2) * width for i in range(len(sizes))], values, width, label=policy)
        scales = {r["replicas"]: r["time_scale"] for r in runs}
        ax.set_xticks(range(len(sizes)), [f"{n} replicas\n(arrival times x{scales[n]:.3g})" for n in sizes])
        ax.set_title(title, fontsize=10)
        if key == "hit_rate":
            ax.axhline(100 * ideal, color="gray", ls="--", lw=1, label="unbounded shared cache")
            ax.set_ylim(0, 110 * ideal)
        if key == "ttft_p50":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    save_figure(fig, "Mooncake conversation trace", runs[0]["slo"], path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time-scale", type=float, default=0.2,
                   help="arrival-time factor at 8 replicas (scaled by 8 / replicas for the other sizes)")
    add_study_args(p, "cluster_sim")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["runs"], saved["ideal_hit_rate"], args.plot)
        return

    model = load_cost_model(args.cost_model)
    limits = dataclasses.replace(model.replica, block_size=args.block_size)
    started = time.perf_counter()
    runs = []
    for n in (int(x) for x in args.replicas.split(",")):
        scale = args.time_scale * 8 / n
        requests = read_mooncake(args.trace, args.limit, scale)
        for policy in POLICIES:
            result = Simulator(requests, n, policy, model, **study_options(args, limits)).run()
            runs.append(summarize(result, args.slo_ttft, args.slo_itl) | {"time_scale": scale})
            print(table(runs[-1:]), file=sys.stderr)
    ideal = ideal_hit_rate(requests)
    print(table(runs))
    for n in sorted({r["replicas"] for r in runs}):
        by = {r["policy"]: r for r in runs if r["replicas"] == n}
        if {"least_loaded", "cache_aware"} <= by.keys():
            ll = by["least_loaded"]["goodput_req_s"]
            print(f"{n:4d} replicas: cache_aware goodput / least_loaded = "
                  f"{by['cache_aware']['goodput_req_s'] / ll if ll else float('inf'):.2f}; cache_aware hit rate "
                  f"{100 * by['cache_aware']['hit_rate']:.1f}% = {by['cache_aware']['hit_rate'] / ideal:.2f} of the "
                  f"unbounded shared cache's {100 * ideal:.1f}%")
    out = {"trace": args.trace, "num_requests": len(requests), "time_scale_at_8": args.time_scale,
           "balance_abs_threshold": args.balance_abs_threshold, "cache_threshold": args.cache_threshold,
           "prefill_weight": args.prefill_weight, "ideal_hit_rate": ideal, "cost_model": model.to_dict(),
           "replica": dataclasses.asdict(limits), "wall_s": time.perf_counter() - started, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(runs, ideal, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
