"""Disaggregated prefill and decode in the cluster simulator: goodput at 90% SLO attainment of P
prefill + (N - P) decode replicas against N colocated ones, on the Mooncake conversation trace.

Replicas as the scale study's (``benchmarks/cluster_sim.py``: Llama-3-8B bf16 on an H100 SXM 80 GB,
128-token KV blocks), routing by ``--policy`` (SGLang's longest-prefix rule by default; of prompts
to prefill replicas when disaggregated, decode replicas chosen least loaded); a prompt's KV moves
at ``--kv-bandwidth`` GB/s (128 KiB per token).  Goodput is DistServe's: the highest request rate at which 90% of the requests meet the
SLO (:func:`infera.sim.goodput.max_goodput`), under two SLOs: the study's (TTFT <= 2 s, mean ITL
<= 100 ms) and a tight-ITL one (mean ITL <= 20 ms), where decoding apart from prefill chunks pays.

    python benchmarks/disagg_sim.py                      # first 3,000 requests, 8 replicas, ~16 min
    python benchmarks/disagg_sim.py --limit 0 --prefill 0,2,4 --json /tmp/d.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import save_json  # noqa: E402
from infera.sim.cost_model import load_cost_model  # noqa: E402
from infera.sim.goodput import max_goodput, trace_rate  # noqa: E402
from infera.sim.trace import read_mooncake  # noqa: E402

TRACE = Path(__file__).resolve().parent.parent.parent / "shared/data/traces/mooncake_conversation_trace.jsonl"
SLOS = {"ttft 2 s, itl 100 ms": (2.0, 0.1), "ttft 2 s, itl 20 ms": (2.0, 0.02)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--limit", type=int, default=3000, help="the trace's first N requests (0: all)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--prefill", default="0,3,4,5,6", help="prefill replicas to try (0: colocated)")
    p.add_argument("--kv-bandwidth", type=float, default=25.0, help="GB/s of a KV transfer")
    p.add_argument("--policy", default="longest_prefix", help="routing (of prompts to prefill replicas when apart)")
    p.add_argument("--start-per-replica", type=float, default=1.5, help="first probe's rate, req/s per replica")
    p.add_argument("--json", default="docs/disagg_sim.json")
    args = p.parse_args()

    model = load_cost_model("roofline:llama-3-8b@h100-sxm")
    limits = dataclasses.replace(model.replica, block_size=128)
    requests = read_mooncake(args.trace, args.limit or None)
    base = trace_rate(requests)
    per_token = limits.kv_bytes_per_token / (args.kv_bandwidth * 1e9)
    results = []
    for slo, (ttft, itl) in SLOS.items():
        for prefill in (int(x) for x in args.prefill.split(",")):
            g = max_goodput(requests, args.replicas, args.policy, model, slo_ttft=ttft, slo_itl=itl,
                            start=args.start_per_replica * args.replicas / base, limits=limits,
                            prefill_replicas=prefill, kv_transfer_s_per_token=per_token)
            results.append({"slo": slo, "prefill_replicas": prefill, "decode_replicas": args.replicas - prefill,
                            **g.to_dict()})
            print(f"{slo}: {prefill}P+{args.replicas - prefill}D" if prefill else f"{slo}: colocated",
                  f"goodput {g.rate_req_s:.2f} req/s", flush=True)
    best = {}
    for slo in SLOS:
        colocated = next(r["rate_req_s"] for r in results if r["slo"] == slo and r["prefill_replicas"] == 0)
        split = max((r for r in results if r["slo"] == slo and r["prefill_replicas"]), key=lambda r: r["rate_req_s"])
        best[slo] = {"best_prefill_replicas": split["prefill_replicas"],
                     "vs_colocated": split["rate_req_s"] / colocated if colocated else None}
    save_json(args.json, {"trace": args.trace, "limit": args.limit, "replicas": args.replicas, "policy": args.policy,
                          "kv_bandwidth_gb_s": args.kv_bandwidth, "cost_model": model.source,
                          "results": results, "best": best})
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
