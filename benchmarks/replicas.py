"""Engine replicas benchmark: routing policies on a multi-tenant workload, against one engine.

Tenants each have a long system prompt (cut from the Python docs that ship with the interpreter,
``pydoc_data.topics``); their users send short turns after it, arriving as a Poisson process.  Each
replica's KV cache holds about two tenants' system prompts, one engine's the four: a router that
keeps a tenant on one replica finds its prompt cached there, one that spreads tenants evicts them.

Runs through :class:`ReplicaPool` (the server's front, minus HTTP): one engine (one replica with
every thread and twice the KV cache) as the reference, then 2 replicas under each routing policy.
Each run has its own tenants' prompts (same lengths, other text), so no run finds another's blocks
cached.  Reports the prefix hit rate (engine-reported cached prompt tokens / prompt tokens), TTFT
p50/p99 at the front, and output throughput; writes JSON, a PNG plot, and the reference run's
workload as a Mooncake-format trace (``timestamp`` ms, ``input_length``, ``output_length``,
``hash_ids`` = the router's block hashes at the engine's block size) for the cluster simulator.

    python benchmarks/replicas.py                 # ~4 minutes on 2 cores
    python benchmarks/replicas.py --requests 40 --rate 1.5 --output /tmp/replicas.json --plot ""
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from common import corpus_text, machine, save_json

from infera.config import EngineConfig, ParallelConfig
from infera.distributed.replica_pool import ReplicaPool
from infera.loader.model_loader import open_model
from infera.loader.tokenizer import Tokenizer
from infera.router import POLICIES, Router, block_hashes
from infera.sampling_params import SamplingParams


@dataclass
class Request:
    arrival: float  # seconds from the start
    prompt: list[int]
    output_len: int


def make_workload(tokenizer, args: argparse.Namespace, seed: int) -> list[Request]:
    """``args.requests`` turns of ``args.tenants`` tenants (chosen uniformly), Poisson arrivals at ``args.rate``/s."""
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    rng = random.Random(seed)

    def cut(n: int) -> list[int]:
        start = rng.randrange(0, len(ids) - n)
        return ids[start:start + n]

    systems = [cut(args.system_len) for _ in range(args.tenants)]
    t, requests = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        user = cut(rng.randint(args.user_len // 2, args.user_len * 3 // 2))
        requests.append(Request(t, systems[rng.randrange(args.tenants)] + user, args.output_len))
    return requests


async def replay(pool: ReplicaPool, requests: list[Request]) -> dict[str, float]:
    """Send ``requests`` at their arrival times; TTFT (front clock), throughput, prefix hit rate, and how
    long an output takes from the replica's engine thread to the front (one clock: one machine)."""
    before = [await r.health.remote() for r in pool.replicas]
    start = time.monotonic()
    ttfts: list[float] = []
    lags: list[float] = []
    generated = 0

    async def one(i: int, req: Request) -> None:
        nonlocal generated
        await asyncio.sleep(max(0.0, start + req.arrival - time.monotonic()))
        sent = time.monotonic()
        params = SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True)
        first = None
        async for out in await pool.add_request(req.prompt, params, f"req-{i}"):
            now = time.monotonic()
            if first is None and out.num_generated_tokens:
                first = now - sent
            if out.metrics is not None and out.metrics.last_token_time is not None:
                lags.append(now - out.metrics.last_token_time)
        ttfts.append(first)
        generated += out.num_generated_tokens

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    elapsed = time.monotonic() - start
    after = [await r.health.remote() for r in pool.replicas]
    queries = sum(a["prefix_queries"] - b["prefix_queries"] for a, b in zip(after, before))
    hits = sum(a["prefix_hits"] - b["prefix_hits"] for a, b in zip(after, before))
    ttfts.sort()
    return {"hit_rate": hits / queries, "router_hit_rate": pool.router.hit_rate,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "output_tok_s": generated / elapsed, "seconds": elapsed,
            "output_delivery_ms_p50": 1000 * statistics.median(lags),
            "prompt_tokens_per_replica": [a["prefix_queries"] - b["prefix_queries"] for a, b in zip(after, before)]}


async def run_policies(pool: ReplicaPool, workloads: dict[str, list[Request]]) -> dict[str, dict[str, float]]:
    """Each workload through ``pool`` with a fresh router of the policy it is named after."""
    pool.start()
    results = {}
    try:
        for policy, requests in workloads.items():
            pool.router = Router(len(pool.replicas), policy, block_capacity=pool.router.indexes[0].capacity)
            results[policy] = await replay(pool, requests)
            print(f"{len(pool.replicas)} replicas, {policy}: {results[policy]}", flush=True)
    finally:
        pool.shutdown()
    return results


def write_trace(path: Path, requests: list[Request], block_size: int) -> None:
    with path.open("w") as f:
        for req in requests:
            f.write(json.dumps({"timestamp": round(req.arrival * 1000), "input_length": len(req.prompt),
                                "output_length": req.output_len, "hash_ids": block_hashes(req.prompt, block_size)})
                    + "\n")


def plot(path: str, results: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(names, [100 * results[n]["hit_rate"] for n in names], color="tab:blue")
    ax1.set_ylabel("prefix hit rate (%)")
    ax1.set_title("cached prompt tokens / prompt tokens")
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [results[n]["ttft_p50_s"] for n in names], 0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [results[n]["ttft_p99_s"] for n in names], 0.4, label="p99")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("TTFT (s)")
    ax2.set_title("time to first token")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--system-len", type=int, default=600, help="tokens of each tenant's system prompt")
    p.add_argument("--user-len", type=int, default=32, help="mean tokens of a user turn")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    p.add_argument("--kv-cache-tokens", type=int, default=1536, help="each replica's KV cache (one engine: twice)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--output", default="docs/replicas.json")
    p.add_argument("--plot", default="docs/replicas.png")
    p.add_argument("--trace", default="docs/replicas_trace.jsonl")
    args = p.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    source = open_model(None)
    tokenizer = Tokenizer(source.tokenizer_dir(), source.config())
    hf = source.config()
    token_bytes = hf.num_hidden_layers * 2 * hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads) * 2

    def config(kv_tokens: int) -> EngineConfig:
        return EngineConfig(kv_cache_memory=kv_tokens * token_bytes, max_model_len=2048)

    policies = args.policies.split(",")
    workloads = [make_workload(tokenizer, args, seed) for seed in range(len(policies) + 1)]
    write_trace(Path(args.trace), workloads[0], EngineConfig().block_size)
    one = ReplicaPool(config(2 * args.kv_cache_tokens), ParallelConfig(1, threads_per_replica=2))
    results = {"one engine": asyncio.run(run_policies(one, {"round_robin": workloads[0]}))["round_robin"]}
    pool = ReplicaPool(config(args.kv_cache_tokens), ParallelConfig(2, threads_per_replica=1))
    results.update(asyncio.run(run_policies(pool, dict(zip(policies, workloads[1:])))))
    ray.shutdown()
    summary = {}
    if {"cache_aware", "round_robin"} <= set(results):
        aware, rr = results["cache_aware"], results["round_robin"]
        summary = {"cache_aware_hit_rate_vs_one_engine": aware["hit_rate"] / results["one engine"]["hit_rate"],
                   "cache_aware_ttft_p50_vs_round_robin": aware["ttft_p50_s"] / rr["ttft_p50_s"]}
    save_json(args.output, {"machine": machine(), "workload": vars(args), "results": results, "summary": summary})
    print(json.dumps(summary, indent=2))
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
