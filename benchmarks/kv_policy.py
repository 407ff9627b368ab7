"""KV policies at long context: batched decode speed and sequences per GiB of KV, per policy, in
one run (infera's own full KV is the baseline).  A policy may be the 2-bit cache (``kivi2``, the
engine's ``--kv-cache-dtype``) or combine with it (``kivi2+streaming:0.25``).

- decode: ``--batch`` sequences of ``--context``-token prompts (cut from the pydoc text), greedy,
  ``--new-tokens`` each; output tok/s after every sequence has its first token, and the KV a
  sequence holds while decoding.
- fit: ``--fit-requests`` such sequences, ``--fit-new-tokens`` each, against a ``--fit-memory`` KV
  cache: the most that decode at once (past their prompts), and whether any was preempted (0
  requests: no fit run).

    python benchmarks/kv_policy.py [--context 4096] [--policies none,streaming:0.25,snapkv:0.25] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, make_workload, save_json  # noqa: E402
from infera.config import parse_size  # noqa: E402
from infera.engine.llm_engine import LLMEngine  # noqa: E402
from infera.eval.passkey import parse_policy  # noqa: E402
from infera.sampling_params import SamplingParams  # noqa: E402


def decode_run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
               ) -> tuple[dict[str, float], list[list[int]]]:
    """Output tok/s once every sequence decodes, and the KV bytes one held then (mean); and the outputs."""
    ids = [engine.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    started = time.perf_counter()
    first = None
    held: list[int] = []
    generated = 0
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        running = engine.scheduler.running
        if first is None and running and all(s.num_output_tokens > 0 for s in running) \
                and not engine.scheduler.waiting:
            first, generated = time.perf_counter(), sum(s.num_output_tokens for s in running)
            bm, kv = engine.block_manager, engine.runner.kv_cache
            held = [kv.held_bytes(bm.num_held_blocks(s), bm.num_staged_slots(s)) for s in running]
    end = time.perf_counter()
    total = len(prompts) * params.max_tokens
    return ({"prefill_s": first - started, "decode_tok_s": (total - generated) / (end - first),
             "kv_bytes_held": sum(held) / len(held)}, [outputs[i] for i in ids])


def long_context_run(engine: LLMEngine, batch: int, context: int, params: SamplingParams
                     ) -> tuple[dict[str, float], list[list[int]], list[list[int]]]:
    """:func:`decode_run` of ``batch`` ``context``-token prompts after a short warm-up request, with
    the KV one sequence held in MiB; and the outputs and prompts."""
    prompts = make_workload(engine.tokenizer, "long", batch, context, context, 1, seed=0).prompts
    engine.add_request(prompts[0][:64], SamplingParams(max_tokens=2))  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    row, outputs = decode_run(engine, prompts, params)
    row["kv_mib_per_seq"] = row.pop("kv_bytes_held") / 2**20
    return row, outputs, prompts


def fit_run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, int]:
    """The most sequences decoding at once (past their prompts) in ``engine``'s KV cache."""
    for p in prompts:
        engine.add_request(p, params)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, sum(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running))
    return {"most_decoding": most, "preemptions": engine.scheduler.num_preemptions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences decoding together")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--policies", default="none,streaming:0.25,snapkv:0.25",
                        help="none or POLICY:BUDGET (a fraction of the prompt, or tokens), each optionally after "
                             "kivi2+ (or kivi2 alone: the 2-bit cache, full KV)")
    parser.add_argument("--fit-memory", default="1GiB", help="KV cache of the fit run")
    parser.add_argument("--fit-requests", type=int, default=24, help="sequences submitted in the fit run")
    parser.add_argument("--fit-new-tokens", type=int, default=256,
                        help="tokens each generates in the fit run (long enough for the prompts to pile up)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    print(f"machine: {machine()}; bundled SmolLM2-135M-Instruct, {args.batch} x {args.context}-token prompts, "
          f"{args.new_tokens} new tokens")
    report = {"machine": machine(), "context": args.context, "batch": args.batch, "new_tokens": args.new_tokens,
              "fit_memory": args.fit_memory, "policies": {}}
    need = parse_size("2GiB") + args.batch * (args.context + args.new_tokens) * 30 * 2 * 3 * 64 * 4
    base = None
    for spec in args.policies.split(","):
        cache = {"kv_cache_dtype": "kivi2"} if spec.startswith("kivi2") else {}
        fields = parse_policy(spec.removeprefix("kivi2").removeprefix("+") or "none")
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, **fields)
        engine = LLMEngine(kv_cache_memory=need, enable_prefix_caching=False, **cache)
        row, _, _ = long_context_run(engine, args.batch, args.context, params)
        del engine
        if args.fit_requests:
            fit = LLMEngine(kv_cache_memory=args.fit_memory, enable_prefix_caching=False, **cache)
            prompts = make_workload(fit.tokenizer, "fit", args.fit_requests, args.context, args.context, 1, seed=1).prompts
            row.update(fit_run(fit, prompts, SamplingParams(temperature=0.0, max_tokens=args.fit_new_tokens,
                                                            ignore_eos=True, **fields)))
            del fit
        base = base or row
        row["decode_vs_full"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["kv_vs_full"] = base["kv_mib_per_seq"] / row["kv_mib_per_seq"]
        fit = ""
        if args.fit_requests:
            row["fit_vs_full"] = row["most_decoding"] / base["most_decoding"]
            fit = (f"; {row['most_decoding']} decoding at once in {args.fit_memory} ({row['fit_vs_full']:.2f}x), "
                   f"{row['preemptions']} preemptions")
        report["policies"][spec] = row
        print(f"{spec:>22}: decode {row['decode_tok_s']:7.1f} tok/s ({row['decode_vs_full']:.2f}x full), "
              f"prefill {row['prefill_s']:6.1f} s, KV {row['kv_mib_per_seq']:6.1f} MiB a sequence "
              f"({row['kv_vs_full']:.2f}x less){fit}", flush=True)
    save_json(args.json, report)


if __name__ == "__main__":
    main()
