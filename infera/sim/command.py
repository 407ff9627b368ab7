"""``infera simulate``: its options and what it runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from infera.router import POLICIES

if TYPE_CHECKING:
    from infera.sim.cost_model import ReplicaLimits

DEFAULT_COST_MODEL = "roofline:llama-3-8b@h100-sxm"


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="a Mooncake-format JSONL trace (timestamp ms, input_length, "
                   "output_length, hash_ids of 512-token blocks)")
    p.add_argument("--replicas", type=int, default=1, help="simulated engine replicas")
    p.add_argument("--policy", default="all", choices=[*POLICIES, "all"], help="routing policy; all: compare them")
    p.add_argument("--cost-model", default=DEFAULT_COST_MODEL,
                   help="a cost-model JSON (from --fit), or roofline:CONFIG@HARDWARE: step times fitted to the "
                        "roofline of a built-in model shape on a GPU, KV cache what 95%% of its memory leaves")
    p.add_argument("--fit", metavar="FILE.json", default=None,
                   help="instead of simulating: measure the bundled model's engine steps on this machine, fit "
                        "the cost model and write it to FILE.json")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the trace's arrival times (0.1: replay ten times as fast)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO: time to first token, seconds")
    p.add_argument("--slo-itl", type=float, default=0.1, help="goodput SLO: mean inter-token latency, seconds")
    p.add_argument("--goodput-goal", type=float, default=None,
                   help="instead of one run at --time-scale: each policy's goodput as DistServe defines it, the "
                        "highest request rate at which this fraction of requests (e.g. 0.9) meet the SLO, found "
                        "by bisection over the rate from --time-scale's (the whole trace simulated per probe)")
    p.add_argument("--goodput-tolerance", type=float, default=0.05,
                   help="--goodput-goal: stop when the highest passing and the lowest failing rate are this "
                        "close (relative)")
    g = p.add_argument_group("replica engine (default: the cost model's)")
    g.add_argument("--kv-tokens", type=int, default=None, help="KV-cache capacity of each replica, tokens")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (must divide 512)")
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--kv-bytes-per-token", type=int, default=None,
                   help="bytes of one token's K and V in all layers (what --prefill-replicas move)")
    d = p.add_argument_group("disaggregated prefill and decode (as infera serve --prefill-replicas)")
    d.add_argument("--prefill-replicas", type=int, default=0,
                   help="of --replicas, how many only prefill (routed by --policy); the rest decode (least loaded)")
    d.add_argument("--kv-transfer-bandwidth", type=float, default=25.0,
                   help="GB/s a prompt's KV moves at from its prefill to its decode replica")
    add_kv_offload_args(p)
    p.add_argument("--balance-abs-threshold", type=int, default=None,
                   help="longest_prefix: how many more outstanding requests than the least loaded replica the "
                        "best-matching one may hold (default: the router's, 32 as SGLang)")
    p.add_argument("--cache-threshold", type=float, default=None,
                   help="longest_prefix: the share of a prompt's blocks the best-matching replica must hold for the "
                        "request to go there, else the least loaded (default: the router's)")
    p.add_argument("--prefill-weight", type=float, default=None,
                   help="cache_aware: the weight of the prompt blocks a replica does not cache against its queued "
                        "prefill and outstanding requests (default: the router's)")
    p.add_argument("--seed", type=int, default=0, help="the router's seed (least_loaded draws replicas)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING")


def add_kv_offload_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("KV offloading (as infera serve --kv-offloading-size)")
    o.add_argument("--kv-offloading-size", type=float, default=None,
                   help="GB of host memory per replica for a second tier of its prefix cache (evicted KV blocks "
                        "copied there and back on a hit); tokens = GB / the KV bytes per token")
    o.add_argument("--kv-load-bandwidth", type=float, default=25.0,
                   help="GB/s at which prefix hits of the host tier are copied back (charged to the step)")


def kv_offload_options(args: argparse.Namespace, limits: ReplicaLimits) -> dict:
    """The :class:`Simulator` options of :func:`add_kv_offload_args`' flags."""
    if not args.kv_offloading_size:
        return {}
    if not limits.kv_bytes_per_token:
        raise ValueError("--kv-offloading-size: the cost model does not say how many bytes a token's KV takes; "
                         "give --kv-bytes-per-token")
    return {"host_kv_tokens": int(args.kv_offloading_size * 1e9 / limits.kv_bytes_per_token),
            "kv_load_s_per_token": limits.kv_bytes_per_token / (args.kv_load_bandwidth * 1e9)}


def run_simulate(args: argparse.Namespace) -> None:
    from infera.sim.cost_model import load_cost_model, measure_local
    from infera.sim.goodput import goodput_table, max_goodput, trace_rate
    from infera.sim.report import summarize, table
    from infera.sim.simulator import Simulator
    from infera.sim.trace import ideal_hit_rate, read_mooncake

    if args.fit:
        model = measure_local(args.fit)
        print(f"wrote {args.fit}: {model.source}; fit error {100 * model.fit_error:.1f}% RMS over "
              f"{model.num_samples} steps\n{json.dumps(model.coefficients, indent=1)}")
        return
    if args.trace is None:
        raise ValueError("--trace is required (or --fit FILE to measure a cost model)")
    model = load_cost_model(args.cost_model)
    overrides = {"num_kv_tokens": args.kv_tokens, "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
                 "max_num_batched_tokens": args.max_num_batched_tokens, "kv_bytes_per_token": args.kv_bytes_per_token}
    limits = dataclasses.replace(model.replica, **{k: v for k, v in overrides.items() if v is not None})
    options = {"limits": limits, "balance_abs_threshold": args.balance_abs_threshold,
               "cache_threshold": args.cache_threshold, "prefill_weight": args.prefill_weight, "seed": args.seed,
               "prefill_replicas": args.prefill_replicas,
               "kv_transfer_s_per_token": limits.kv_bytes_per_token / (args.kv_transfer_bandwidth * 1e9)}
    if args.prefill_replicas and not limits.kv_bytes_per_token:
        raise ValueError("--prefill-replicas: the cost model does not say how many bytes a token's KV takes; "
                         "give --kv-bytes-per-token")
    options.update(kv_offload_options(args, limits))
    requests = read_mooncake(args.trace, args.limit, args.time_scale)
    ideal = ideal_hit_rate(requests)
    print(f"{len(requests)} requests from {args.trace} (time scale {args.time_scale:g}); {args.replicas} replicas; "
          f"ideal hit rate (unbounded shared cache) {100 * ideal:.1f}%\ncost model: {model.source}\n"
          f"replica: {limits}" + (f"; host KV tier {options['host_kv_tokens']} tokens"
                                  if args.kv_offloading_size else ""), file=sys.stderr)
    policies = POLICIES if args.policy == "all" else [args.policy]
    if args.goodput_goal is not None:
        searches = [max_goodput(requests, args.replicas, policy, model, slo_ttft=args.slo_ttft, slo_itl=args.slo_itl,
                                goal=args.goodput_goal, tolerance=args.goodput_tolerance, **options)
                    for policy in policies]
        print(goodput_table(searches))
        if args.json:
            out = {"trace": str(args.trace), "num_requests": len(requests), "time_scale": args.time_scale,
                   "trace_rate_req_s": trace_rate(requests),
                   "slo": {"ttft_s": args.slo_ttft, "mean_itl_s": args.slo_itl},
                   "cost_model": model.to_dict(), "replica": dataclasses.asdict(limits),
                   "goodput": [g.to_dict() for g in searches]}
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
        return
    summaries = []
    for policy in policies:
        summaries.append(summarize(Simulator(requests, args.replicas, policy, model, **options).run(),
                                   args.slo_ttft, args.slo_itl))
    print(table(summaries))
    if args.json:
        out = {"trace": str(args.trace), "num_requests": len(requests), "time_scale": args.time_scale,
               "ideal_hit_rate": ideal, "cost_model": model.to_dict(), "replica": dataclasses.asdict(limits),
               "runs": summaries}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
