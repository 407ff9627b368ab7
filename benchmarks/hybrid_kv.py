"""Gemma 3's hybrid KV cache at long context, in one run: the KV one sequence holds, how long a context
and how many sequences a KV budget holds, and batched decode speed, for infera's hybrid cache (sliding
layers keep their window's blocks), infera with every layer keeping its whole context
(``--disable-hybrid-kv-cache-manager``) and llama.cpp on the same GGUF file with its sliding-window
cache (``swa_full`` off; llama-cpp-python's default keeps full-size SWA caches).

- decode: ``--batch`` sequences of ``--context``-token prompts (pydoc prose), greedy, ``--new-tokens``
  each, float16 KV for all three; output tok/s once every sequence has its first token; the KV one
  sequence holds then (infera: its blocks in the pool; llama.cpp: ``llama_state_seq_get_size``).
- fit: ``--fit-memory`` of KV: the longest context, and how many ``--context`` + ``--new-tokens``
  sequences the allocator gives slots to at once (infera's block manager, stepped as the scheduler
  steps prompts in chunks; no model run).

    python benchmarks/hybrid_kv.py [--context 8192] [--batch 4] [--new-tokens 32] [--json FILE]
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import have, machine, save_json  # noqa: E402
from benchmarks.kv_policy import long_context_run  # noqa: E402
from infera.config import parse_size  # noqa: E402
from infera.engine.llm_engine import LLMEngine  # noqa: E402
from infera.engine.sequence import Sequence  # noqa: E402
from infera.loader.model_store import cached_path  # noqa: E402
from infera.sampling_params import SamplingParams  # noqa: E402

MODEL = "gemma-3-270m"


def sequences_that_fit(engine: LLMEngine, num_tokens: int) -> int:
    """How many ``num_tokens``-token sequences get slots at once, each stepped to its end in chunks of
    ``max_num_batched_tokens`` (a sliding group releases blocks as its window moves)."""
    bm, chunk = engine.block_manager, engine.scheduler.max_num_batched_tokens
    held: list[Sequence] = []
    while True:
        seq = Sequence([0] * num_tokens, SamplingParams())
        while seq.num_computed_tokens < num_tokens:
            n = min(chunk, num_tokens - seq.num_computed_tokens)
            if not bm.allocate_slots(seq, n):
                bm.free(seq)
                for s in held:
                    bm.free(s)
                return len(held)
            bm.commit(seq, n)
        held.append(seq)


def infera_row(hybrid: bool, args: argparse.Namespace, params: SamplingParams
               ) -> tuple[dict, list[list[int]], list[list[int]]]:
    """(figures, outputs, prompts) of infera with or without the hybrid cache."""
    common = {"model": MODEL, "kv_cache_dtype": "float16", "disable_hybrid_kv_cache_manager": not hybrid}
    need = parse_size("256MiB") + args.batch * (args.context + args.new_tokens) * 18 * 1024
    engine = LLMEngine(kv_cache_memory=need, **common)
    row, outputs, prompts = long_context_run(engine, args.batch, args.context, params)
    del engine
    fit = LLMEngine(kv_cache_memory=args.fit_memory, **common)
    row["longest_context"] = fit.worker.kv_cache_tokens
    row["sequences_that_fit"] = sequences_that_fit(fit, args.context + args.new_tokens)
    return row, outputs, prompts


def llama_cpp_row(prompts: list[list[int]], new_tokens: int) -> dict:
    from benchmarks.peers import LlamaCpp

    n_ctx = len(prompts) * (len(prompts[0]) + new_tokens + 256)
    peer = LlamaCpp(cached_path(MODEL), n_ctx=n_ctx, n_seq=len(prompts), swa_full=False)  # (float16 KV)
    try:
        timing = peer.generate(prompts, new_tokens)
        state = [peer.lib.llama_state_seq_get_size(peer.ctx, ctypes.c_int32(s)) for s in range(len(prompts))]
    finally:
        peer.close()
    decoded = len(prompts) * (new_tokens - 1)
    return {"prefill_s": timing["prefill_s"], "decode_tok_s": decoded / timing["decode_s"],
            "kv_mib_per_seq": sum(state) / len(state) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences decoding together")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--fit-memory", default="1GiB", help="the KV budget of the fit figures")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    if not cached_path(MODEL).is_file():
        sys.exit(f"{MODEL} is not downloaded: make models")
    print(f"machine: {machine()}; {MODEL} Q4_K_M, {args.batch} x {args.context}-token prompts, "
          f"{args.new_tokens} new tokens, float16 KV")
    report = {"machine": machine(), "model": MODEL, "context": args.context, "batch": args.batch,
              "new_tokens": args.new_tokens, "fit_memory": args.fit_memory, "rows": {}}
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    outputs = {}
    for name, hybrid in (("infera hybrid", True), ("infera full KV", False)):
        row, outputs[name], prompts = infera_row(hybrid, args, params)
        report["rows"][name] = row
        print(f"{name:>15}: decode {row['decode_tok_s']:6.1f} tok/s, prefill {row['prefill_s']:6.1f} s, "
              f"KV {row['kv_mib_per_seq']:6.1f} MiB a sequence; in {args.fit_memory}: contexts up to "
              f"{row['longest_context']} tokens, {row['sequences_that_fit']} sequences of "
              f"{args.context + args.new_tokens}", flush=True)
    report["outputs_identical"] = outputs["infera hybrid"] == outputs["infera full KV"]
    if have("llama_cpp"):
        row = llama_cpp_row(prompts, args.new_tokens)
        report["rows"]["llama.cpp swa"] = row
        print(f"{'llama.cpp swa':>15}: decode {row['decode_tok_s']:6.1f} tok/s, prefill {row['prefill_s']:6.1f} s, "
              f"KV {row['kv_mib_per_seq']:6.1f} MiB a sequence", flush=True)
    hybrid, full = report["rows"]["infera hybrid"], report["rows"]["infera full KV"]
    print(f"hybrid vs full KV: {full['kv_mib_per_seq'] / hybrid['kv_mib_per_seq']:.2f}x less KV a sequence, "
          f"{hybrid['sequences_that_fit'] / full['sequences_that_fit']:.2f}x the sequences, decode "
          f"{hybrid['decode_tok_s'] / full['decode_tok_s']:.2f}x; outputs identical: {report['outputs_identical']}")
    if "llama.cpp swa" in report["rows"]:
        peer = report["rows"]["llama.cpp swa"]
        print(f"hybrid vs llama.cpp: decode {hybrid['decode_tok_s'] / peer['decode_tok_s']:.2f}x, KV a sequence "
              f"{hybrid['kv_mib_per_seq'] / peer['kv_mib_per_seq']:.2f}x")
    save_json(args.json, report)


if __name__ == "__main__":
    main()
