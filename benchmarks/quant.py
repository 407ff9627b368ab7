"""Weight formats on the bundled model, in one run: memory, perplexity, single-stream decode and
batch-64 throughput per format, beside llama.cpp on the same GGUF and on its Q4_0 requantization
(when llama-cpp-python is installed: `make bench`).

Rows: float32 / bfloat16 (the GGUF dequantized), gguf (its own Q4_1/Q8_0 tensors run natively,
with the engine's auto activation dtype, with float32 activations, and with an int8 KV cache),
the GGUF block formats requantized from the dequantized weights (q8_0, q4_0, q4_1) and each
quantizer (int8, int4, int4_ic, llm_int8, dense_sparse, trit_planes). Single stream: a 512-token
prompt, 128 new tokens, decode tok/s after the first token (median of 3 runs). Batch: 64 requests
of 64-128-token prompts, 64 new tokens each, output tok/s over the whole run. Perplexity:
`infera eval --task perplexity` windows.

    python benchmarks/quant.py [--methods float32,gguf,int4] [--threads 2] [--json FILE] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.common import (Workload, have, machine, make_workload, median_decode_s,  # noqa: E402
                               run_engine, save_json)
from infera.engine.llm_engine import LLMEngine  # noqa: E402
from infera.eval.perplexity import perplexity  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402

ROWS = {  # label -> engine options
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "gguf": dict(quantization="gguf"),
    "gguf/fp32-act": dict(quantization="gguf", dtype="float32"),
    "gguf/kv-int8": dict(quantization="gguf", kv_cache_dtype="int8"),
    **{m: dict(quantization=m) for m in ("q8_0", "q4_0", "q4_1", "int8", "int4", "int4_ic", "llm_int8",
                                         "dense_sparse", "trit_planes")},
}


def measure(label: str, options: dict, single: Workload, batch: Workload, windows: int) -> dict[str, float]:
    started = time.perf_counter()
    engine = LLMEngine(model=str(default_model_path()), kv_cache_memory="1GiB", enable_prefix_caching=False, **options)
    load_s = time.perf_counter() - started
    run_engine(engine, Workload("warm-up", [single.prompts[0][:32]], 4))
    ppl, _ = perplexity(engine, windows, 512)
    decode_s, b = median_decode_s(lambda: run_engine(engine, single)), run_engine(engine, batch)
    return {"weight_mib": engine.weight_bytes / 2**20, "perplexity": ppl, "load_s": load_s,
            "decode_tok_s": (single.output_len - 1) / decode_s, "batch_tok_s": batch.output_tokens / b["seconds"]}


def llama_cpp_row(gguf: Path, single: Workload, batch: Workload, threads: int) -> dict[str, float]:
    from benchmarks.peers import run_llama_cpp

    decode_s, b = median_decode_s(lambda: run_llama_cpp(gguf, single, threads)), run_llama_cpp(gguf, batch, threads)
    return {"weight_mib": gguf.stat().st_size / 2**20, "perplexity": float("nan"), "load_s": float("nan"),
            "decode_tok_s": (single.output_len - 1) / decode_s, "batch_tok_s": batch.output_tokens / b["seconds"]}


def plot(results: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("decode_tok_s", "batch_tok_s", "perplexity"),
                              ("single-stream decode tok/s", "batch-64 output tok/s", "perplexity")):
        ax.bar(labels, [results[k][key] for k in labels], color=["tab:orange" if k.startswith("llama.cpp") else "tab:blue"
                                                                 for k in labels])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (infera and llama.cpp)")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart")
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in ROWS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    gguf = default_model_path()
    tok = LLMEngine(model=str(gguf), kv_cache_memory="16MiB").tokenizer
    single = make_workload(tok, "single", 1, 512, 512, 128, seed=1)
    batch = make_workload(tok, "batch", 64, 64, 128, 64, seed=0)
    print(f"machine: {machine()}\nmodel: {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB)\n")
    header = f"{'format':<14} {'weights MiB':>11} {'perplexity':>10} {'decode tok/s':>12} {'batch-64 tok/s':>14} {'load s':>7}"
    print(header)
    results: dict[str, dict[str, float]] = {}

    def show(label: str) -> None:
        r = results[label]
        print(f"{label:<14} {r['weight_mib']:>11.1f} {r['perplexity']:>10.3f} {r['decode_tok_s']:>12.1f} "
              f"{r['batch_tok_s']:>14.1f} {r['load_s']:>7.1f}", flush=True)

    for label in args.methods.split(","):
        results[label] = measure(label, ROWS[label], single, batch, args.windows)
        show(label)
    if have("llama_cpp"):
        from benchmarks.peers import llama_cpp_quantize

        results["llama.cpp"] = llama_cpp_row(gguf, single, batch, args.threads)
        show("llama.cpp")
        with tempfile.TemporaryDirectory() as tmp:  # llama.cpp at its best: Q4_0, its repacked CPU kernels
            results["llama.cpp Q4_0"] = llama_cpp_row(llama_cpp_quantize(gguf, Path(tmp) / "q4_0.gguf"), single,
                                                      batch, args.threads)
        show("llama.cpp Q4_0")
    else:
        print("llama.cpp: llama-cpp-python is not installed (make bench installs it)")
    print()
    best_native = max((results[k]["decode_tok_s"] for k in ("gguf", "gguf/fp32-act") if k in results), default=None)
    if best_native and "llama.cpp" in results:
        print(f"native Q4_1 decode vs llama.cpp: {best_native / results['llama.cpp']['decode_tok_s']:.2f}x "
              f"(target >= 1.2x), vs llama.cpp Q4_0: {best_native / results['llama.cpp Q4_0']['decode_tok_s']:.2f}x")
    if "q4_0" in results and "llama.cpp Q4_0" in results:
        print(f"q4_0 decode vs llama.cpp Q4_0: "
              f"{results['q4_0']['decode_tok_s'] / results['llama.cpp Q4_0']['decode_tok_s']:.2f}x")
    if "bfloat16" in results:
        for k in ("gguf", "q4_0", "q4_1", "int4"):
            if k in results:
                print(f"batch-64 {k} vs bfloat16: {results[k]['batch_tok_s'] / results['bfloat16']['batch_tok_s']:.2f}x "
                      f"(target >= 0.9x)")
    save_json(args.json, {"machine": machine(), "model": gguf.name, "threads": args.threads, "results": results})
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
