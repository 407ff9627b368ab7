"""Disaggregated prefill and decode against one colocated engine, on a bursty workload.

Workload (``--seed`` fixes it): ``--streams`` chat streams (short prompts, ``--stream-len`` new
tokens each) start together and decode throughout, while ``--bursts`` bursts of ``--burst-size``
long prompts (``--long-len`` tokens cut from the Python docs, ``--long-output`` new tokens) arrive
every ``--burst-gap`` seconds.  In a colocated engine each burst's prefill chunks share steps with the
decoding streams, which stall; disaggregated, the prompts run on the prefill replica and only their
KV (and a tail of less than a block) reaches the decode replica.

Runs through :class:`ReplicaPool` (the server's front, minus HTTP), greedy: the colocated engine is
one replica of 2 threads, the pair 1 prefill + 1 decode replica of 1 thread each.  Reports TTFT and
ITL (the gaps between a request's streamed tokens) p50/p99, output throughput, and the KV bytes moved
per prompt token and per output token.

    python benchmarks/disagg.py                   # ~3 minutes on 2 cores
    python benchmarks/disagg.py --bursts 2 --output /tmp/disagg.json --plot ""
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import ray
from common import corpus_text, machine, save_json

from infera.config import EngineConfig, ParallelConfig
from infera.distributed.replica_pool import ReplicaPool
from infera.loader.model_loader import open_model
from infera.loader.tokenizer import Tokenizer
from infera.sampling_params import SamplingParams


@dataclass
class Request:
    arrival: float  # seconds from the start
    prompt: list[int]
    output_len: int
    kind: str  # "stream" or "burst"


def make_workload(tokenizer, args: argparse.Namespace) -> list[Request]:
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    rng = random.Random(args.seed)

    def cut(n: int) -> list[int]:
        start = rng.randrange(0, len(ids) - n)
        return ids[start:start + n]

    requests = [Request(0.0, cut(32), args.stream_len, "stream") for _ in range(args.streams)]
    for b in range(args.bursts):
        t = args.first_burst + b * args.burst_gap
        requests += [Request(t, cut(args.long_len), args.long_output, "burst") for _ in range(args.burst_size)]
    return requests


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def replay(pool: ReplicaPool, requests: list[Request], tag: str) -> dict[str, float]:
    """Send ``requests`` at their arrival times; TTFT and ITL at the front, throughput, KV moved."""
    pool.start()
    start = time.monotonic()
    ttfts: dict[str, list[float]] = {"stream": [], "burst": []}
    itls: dict[str, list[float]] = {"stream": [], "burst": []}
    generated = prompt_tokens = 0

    async def one(i: int, req: Request) -> None:
        nonlocal generated, prompt_tokens
        await asyncio.sleep(max(0.0, start + req.arrival - time.monotonic()))
        sent = last = time.monotonic()
        params = SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True)
        seen = 0
        async for out in await pool.add_request(req.prompt, params, f"{tag}-{i}"):
            now = time.monotonic()
            n = out.num_generated_tokens
            if n > seen:
                if seen == 0:
                    ttfts[req.kind].append(now - sent)
                else:  # a poll may bring several tokens: the gap is shared among them
                    itls[req.kind] += [(now - last) / (n - seen)] * (n - seen)
                seen, last = n, now
        generated += seen
        prompt_tokens += len(req.prompt)

    try:
        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        elapsed = time.monotonic() - start
        stats = pool.stats
    finally:
        pool.shutdown()
    moved = stats.get("kv_transfer_bytes", 0)
    out = {"seconds": elapsed, "output_tok_s": generated / elapsed, "kv_bytes_moved": moved,
           "kv_bytes_per_prompt_token": moved / prompt_tokens, "kv_bytes_per_output_token": moved / generated}
    for kind in ("stream", "burst"):
        out[f"{kind}_ttft_p50_s"], out[f"{kind}_ttft_p99_s"] = pct(ttfts[kind], 0.5), pct(ttfts[kind], 0.99)
    every = itls["stream"] + itls["burst"]
    out["itl_p50_ms"], out["itl_p99_ms"] = 1000 * statistics.median(every), 1000 * pct(every, 0.99)
    out["stream_itl_p50_ms"], out["stream_itl_p99_ms"] = (1000 * statistics.median(itls["stream"]),
                                                          1000 * pct(itls["stream"], 0.99))
    return out


def plot(path: str, results: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = [n.replace(" (", "\n(") for n in names]
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, [("itl", "inter-token latency (ms)"), ("burst_ttft", "burst prompts' TTFT (s)")]):
        unit = "_ms" if key == "itl" else "_s"
        ax.bar([i - 0.2 for i in x], [results[n][f"{key}_p50{unit}"] for n in names], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [results[n][f"{key}_p99{unit}"] for n in names], 0.4, label="p99")
        ax.set_xticks(list(x), labels)
        ax.set_title(label)
        ax.legend()
    axes[2].bar(labels, [results[n]["output_tok_s"] for n in names], color="tab:green")
    axes[2].set_title("output tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4, help="chat streams decoding from the start")
    p.add_argument("--stream-len", type=int, default=800, help="new tokens of each stream")
    p.add_argument("--bursts", type=int, default=4)
    p.add_argument("--burst-size", type=int, default=3, help="long prompts per burst")
    p.add_argument("--first-burst", type=float, default=2.0, help="seconds before the first burst")
    p.add_argument("--burst-gap", type=float, default=6.0, help="seconds between bursts")
    p.add_argument("--long-len", type=int, default=1024, help="tokens of a burst's prompts")
    p.add_argument("--long-output", type=int, default=16, help="new tokens of a burst's prompts")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="docs/disagg.json")
    p.add_argument("--plot", default="docs/disagg.png")
    args = p.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    source = open_model(None)
    tokenizer = Tokenizer(source.tokenizer_dir(), source.config())
    requests = make_workload(tokenizer, args)
    config = EngineConfig(max_model_len=2048, kv_cache_memory="512MiB", kv_cache_dtype=args.kv_cache_dtype)
    systems = {"colocated (1 x 2 threads)": ParallelConfig(1, threads_per_replica=2),
               "disaggregated (1P + 1D x 1 thread)": ParallelConfig(prefill_replicas=1, decode_replicas=1)}
    results = {}
    for i, (name, parallel) in enumerate(systems.items()):
        results[name] = asyncio.run(replay(ReplicaPool(config, parallel), requests, f"run{i}"))
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    ray.shutdown()
    colo, dis = results.values()
    summary = {"itl_p99_vs_colocated": dis["itl_p99_ms"] / colo["itl_p99_ms"],
               "throughput_vs_colocated": dis["output_tok_s"] / colo["output_tok_s"],
               "burst_ttft_p50_vs_colocated": dis["burst_ttft_p50_s"] / colo["burst_ttft_p50_s"]}
    save_json(args.output, {"machine": machine(), "workload": vars(args), "results": results, "summary": summary})
    print(json.dumps(summary, indent=2))
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
