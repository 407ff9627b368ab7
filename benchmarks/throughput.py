"""Offline throughput of infera against llama.cpp and HF transformers, in one run.

Workload A: 64 requests, prompts 128-512 tokens, 128 output tokens each (greedy, EOS ignored).
Workload B: one request, 512-token prompt, 128 output tokens (prefill and decode tok/s).

    python benchmarks/throughput.py [--peers llama.cpp,llama.cpp-q4_0,hf-float32,hf-bfloat16] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.common import Workload, have, machine, make_workload, run_engine, save_json  # noqa: E402
from infera import LLM, SamplingParams  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402

ALL_PEERS = ["llama.cpp", "llama.cpp-q4_0", "hf-float32", "hf-bfloat16"]


def run_peer(name: str, gguf: Path, workload: Workload, pad_id: int, cache: Path) -> dict[str, float]:
    from benchmarks import peers

    if name == "llama.cpp":
        return peers.run_llama_cpp(gguf, workload)
    if name == "llama.cpp-q4_0":
        return peers.run_llama_cpp(peers.llama_cpp_quantize(gguf, cache / "model-q4_0.gguf"), workload)
    dtype = {"hf-float32": torch.float32, "hf-bfloat16": torch.bfloat16}[name]
    return peers.run_hf(gguf, workload, dtype, pad_id)


def report(workload: Workload, results: dict[str, dict[str, float]], single: bool) -> list[str]:
    lines = [f"{workload.name}: {len(workload.prompts)} requests, {workload.prompt_tokens} prompt tokens, "
             f"{workload.output_tokens} output tokens"]
    ours = results["infera"]
    if single:
        lines.append(f"{'engine':<16} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill ratio':>14} {'decode ratio':>13}")
        for name, r in results.items():
            pre = workload.prompt_tokens / r["prefill_s"]
            dec = (workload.output_len - 1) / r["decode_s"]
            ratio_p = (workload.prompt_tokens / ours["prefill_s"]) / pre
            ratio_d = ((workload.output_len - 1) / ours["decode_s"]) / dec
            lines.append(f"{name:<16} {pre:>14.0f} {dec:>13.1f} {ratio_p:>13.2f}x {ratio_d:>12.2f}x")
    else:
        lines.append(f"{'engine':<16} {'seconds':>8} {'output tok/s':>13} {'total tok/s':>12} {'infera is':>10}")
        for name, r in results.items():
            out = workload.output_tokens / r["seconds"]
            total = (workload.output_tokens + workload.prompt_tokens) / r["seconds"]
            lines.append(f"{name:<16} {r['seconds']:>8.1f} {out:>13.1f} {total:>12.1f} "
                         f"{r['seconds'] / ours['seconds']:>9.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    parser.add_argument("--peers", default=",".join(ALL_PEERS), help="comma-separated subset of " + ", ".join(ALL_PEERS))
    parser.add_argument("--dtype", default="auto", help="infera's dtype (auto = its best on this machine)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()

    gguf = Path(args.model) if args.model else default_model_path()
    peers = [p for p in args.peers.split(",") if p]
    if not have("llama_cpp"):
        skipped = [p for p in peers if p.startswith("llama.cpp")]
        if skipped:
            print(f"llama-cpp-python is not installed (make bench installs it): skipping {', '.join(skipped)}")
        peers = [p for p in peers if not p.startswith("llama.cpp")]
    llm = LLM(str(gguf), dtype=args.dtype)
    tok = llm.tokenizer
    workloads = [
        (make_workload(tok, "workload A (batched)", args.requests, 128, 512, 128, seed=0), False),
        (make_workload(tok, "workload B (single stream)", 1, 512, 512, 128, seed=1), True),
    ]
    llm.generate([workloads[0][0].prompts[0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    cache = Path(tempfile.gettempdir()) / "infera-bench"
    pad_id = sorted(tok.eos_token_ids)[0]
    print(f"machine: {machine()}\nmodel: {gguf.name}; infera dtype {llm.engine.dtype}\n")
    everything: dict = {"machine": machine(), "model": gguf.name}
    for workload, single in workloads:
        results = {"infera": run_engine(llm.engine, workload)}
        for peer in peers:
            print(f"  running {peer} on {workload.name} ...", flush=True)
            results[peer] = run_peer(peer, gguf, workload, pad_id, cache)
        lines = report(workload, results, single)
        print("\n".join(lines) + "\n", flush=True)
        everything[workload.name] = results
    save_json(args.json, everything)


if __name__ == "__main__":
    main()
