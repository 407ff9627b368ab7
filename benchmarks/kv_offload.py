"""KV offloading benchmark: a KV cache too small for its tenants, with and without a host tier, against
llama.cpp with and without llama-cpp-python's RAM prompt cache (``LlamaRAMCache``), on the same file.

Tenants each have a long system prompt (cut from ``pydoc_data.topics``); one user stream sends short
turns, each after a tenant's prompt chosen at random, one at a time (llama-cpp-python serves one
stream).  infera's KV cache holds about two tenants' prompts (``--kv-tokens``): without a host tier
most turns recompute their tenant's prompt; with ``kv_offloading_size`` the evicted blocks wait in
host memory and come back as copies.  The reference is infera with a KV cache for every tenant.
llama.cpp keeps the last prompt in its context (a turn of the same tenant reuses it) and, with
``LlamaRAMCache``, a saved context state per earlier prompt, restoring the longest match.

Reports TTFT p50/p90 and the mean turn time per configuration, infera's prefix hit rate, the
ratios, and checks that the host tier changes no output (greedy).

    python benchmarks/kv_offload.py                          # ~3 minutes on 2 cores
    python benchmarks/kv_offload.py --turns 24 --json '' --no-llama-cpp
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from common import corpus_text, have, machine, save_json

from infera import LLM, SamplingParams
from infera.engine.kv_cache import KVCachePool
from infera.layers.attention import Attention
from infera.loader.model_loader import default_model_path


def make_turns(tokenizer, args: argparse.Namespace) -> list[list[int]]:
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    rng = random.Random(args.seed)

    def cut(n: int) -> list[int]:
        start = rng.randrange(0, len(ids) - n)
        return ids[start:start + n]

    systems = [cut(args.system_len) for _ in range(args.tenants)]
    return [systems[rng.randrange(args.tenants)] + cut(rng.randint(args.user_len // 2, args.user_len * 3 // 2))
            for _ in range(args.turns)]


def summary(ttfts: list[float], totals: list[float], **extra) -> dict:
    q = statistics.quantiles(ttfts, n=10)
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": q[8], "turn_mean_s": statistics.mean(totals),
            **extra}


def run_infera(model: str, turns: list[list[int]], args: argparse.Namespace, kv_tokens: int,
               offload_gib: float | None) -> tuple[dict, list[list[int]]]:
    llm = LLM(model, dtype=args.dtype, kv_cache_memory="1MiB")  # only to size the cache in this model's blocks
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    block = KVCachePool.block_bytes(layers, llm.engine.config.block_size, llm.engine.dtype, "auto")
    memory = -(-kv_tokens // llm.engine.config.block_size) * block
    del llm
    llm = LLM(model, dtype=args.dtype, kv_cache_memory=memory, kv_offloading_size=offload_gib)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([turns[0][:64]], params, use_tqdm=False)  # warm-up, nothing shared with the turns
    ttfts, totals, outputs, cached, prompt = [], [], [], 0, 0
    for ids in turns:
        started = time.perf_counter()
        [out] = llm.generate([ids], params, use_tqdm=False)
        totals.append(time.perf_counter() - started)
        m = out.metrics
        ttfts.append(m.first_token_time - m.arrival_time)
        cached += m.num_cached_tokens
        prompt += len(ids)
        outputs.append(list(out.outputs[0].token_ids))
    bm = llm.engine.block_manager
    extra = {"hit_rate": cached / prompt, "kv_cache_tokens": llm.engine.worker.kv_cache_tokens,
             "host_tier_tokens": (bm.host.num_blocks * bm.block_size) if bm.host else 0,
             "loaded_blocks": bm.num_loaded_blocks, "offloaded_blocks": bm.num_offloaded_blocks}
    return summary(ttfts, totals, **extra), outputs


def run_llama_cpp(model: str, turns: list[list[int]], args: argparse.Namespace, ram_cache_bytes: int) -> dict:
    from llama_cpp import Llama, LlamaRAMCache

    llm = Llama(model, n_ctx=args.system_len * 2 + 256, n_threads=2, n_threads_batch=2, n_batch=512,
                verbose=False)
    if ram_cache_bytes:
        llm.set_cache(LlamaRAMCache(capacity_bytes=ram_cache_bytes))
    list(llm.create_completion(turns[0][:64], max_tokens=args.output_len, temperature=0.0, stream=True))
    ttfts, totals = [], []
    for ids in turns:
        started = time.perf_counter()
        first = None
        for _ in llm.create_completion(ids, max_tokens=args.output_len, temperature=0.0, stream=True):
            first = first or time.perf_counter()
        totals.append(time.perf_counter() - started)
        ttfts.append(first - started)
    return summary(ttfts, totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GGUF file (default: the bundled model)")
    p.add_argument("--tenants", type=int, default=6)
    p.add_argument("--system-len", type=int, default=600, help="tokens of each tenant's system prompt")
    p.add_argument("--user-len", type=int, default=32, help="mean tokens of a user turn")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--turns", type=int, default=48)
    p.add_argument("--kv-tokens", type=int, default=1536, help="infera's KV cache (about two tenants' prompts)")
    p.add_argument("--offload-gib", type=float, default=0.25, help="the host tier, and llama.cpp's RAM cache")
    p.add_argument("--dtype", default="float32",
                   help="infera's activations (float32: outputs do not depend on what was cached, so the host "
                        "tier's can be checked against the others'; auto: bfloat16 where the CPU has it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--json", default="docs/kv_offload.json", help="'' for none")
    args = p.parse_args()
    model = args.model or str(default_model_path())
    probe = LLM(model, dtype=args.dtype, kv_cache_memory="1MiB")
    turns = make_turns(probe.tokenizer, args)
    del probe
    everyone = args.tenants * (args.system_len + 2 * args.user_len + args.output_len)
    results, outputs = {}, {}
    for name, kv, gib in (("infera", args.kv_tokens, None), ("infera + host tier", args.kv_tokens, args.offload_gib),
                          ("infera, KV for every tenant", everyone, None)):
        results[name], outputs[name] = run_infera(model, turns, args, kv, gib)
        print(name, results[name], flush=True)
    same = outputs["infera"] == outputs["infera + host tier"] == outputs["infera, KV for every tenant"]
    if not args.no_llama_cpp and have("llama_cpp"):
        for name, ram in (("llama.cpp", 0), ("llama.cpp + RAM cache", int(args.offload_gib * 2**30))):
            results[name] = run_llama_cpp(model, turns, args, ram)
            print(name, results[name], flush=True)

    print(f"\n{machine()}; {len(turns)} turns of {args.tenants} tenants ({args.system_len}-token system prompts), "
          f"{args.output_len} output tokens, one at a time")
    print(f"{'':30s} {'hit rate':>8s} {'TTFT p50':>9s} {'TTFT p90':>9s} {'turn':>7s}")
    for name, r in results.items():
        hit = f"{100 * r['hit_rate']:.1f}%" if "hit_rate" in r else "-"
        print(f"{name:30s} {hit:>8s} {r['ttft_p50_s']:8.3f}s {r['ttft_p90_s']:8.3f}s {r['turn_mean_s']:6.3f}s")
    base, tier = results["infera"], results["infera + host tier"]
    ratios = {"ttft_p50_vs_no_tier": tier["ttft_p50_s"] / base["ttft_p50_s"]}
    if "llama.cpp + RAM cache" in results:
        ratios["ttft_p50_vs_llama_cpp_ram_cache"] = tier["ttft_p50_s"] / results["llama.cpp + RAM cache"]["ttft_p50_s"]
        ratios["turn_vs_llama_cpp_ram_cache"] = tier["turn_mean_s"] / results["llama.cpp + RAM cache"]["turn_mean_s"]
    print("ratios (infera + host tier / other):", {k: round(v, 3) for k, v in ratios.items()})
    print(f"greedy outputs identical with and without the host tier and with a cache for every tenant: {same}")
    save_json(args.json, {"machine": machine(), "args": vars(args), "results": results, "ratios": ratios,
                          "outputs_identical": same})
    if not same:
        raise SystemExit("the host tier changed an output")


if __name__ == "__main__":
    main()
