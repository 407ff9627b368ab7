"""Portable CPU: infera at every ISA level this CPU runs, against llama.cpp and HF transformers on
the same GGUF files, in one run.

Models: the bundled SmolLM2-135M-Instruct Q4_1 and Qwen2.5-Coder-1.5B-Instruct Q4_K_M (`make
models`). Per model, for infera at each level (``INFERA_CPU_ISA``, auto dtype: bfloat16 activations
where the level has bf16 arithmetic, else float32) and for each peer:
- decode: single stream, a 512-token prompt, 128 new tokens; tok/s after the first token (median of 3);
- pp512: the same prompt's prefill, tok/s (time to the first token);
- batch-16 / batch-64: 16 or 64 requests of 64-128-token prompts, 64 new tokens each; output tok/s;
- bound: single-stream decode as a fraction of the bandwidth bound, file bytes x tok/s / the read
  bandwidth measured at the start (a sum over 512 MiB).
Peers: llama.cpp through llama-cpp-python (`make bench` builds it; ``--threads`` threads) on the same
file and, for the bundled model, on its Q4_0 requantization (llama.cpp's fastest CPU format); HF
transformers (float32 from the GGUF, one single-stream run: it loads the file for each run). On a
CPU with AVX-512, `make bench-cpu` also builds llama.cpp for AVX2 only (``--llama-avx2 DIR``, a
child process imports it): the peer of infera's avx2 level, what an AVX2 machine (AMD Zen 1-3,
Intel client CPUs) runs; infera's avx2 row is compared with it, the other levels with the native build.
``--rounds N`` measures infera and the llama.cpp peers N times, one after another in turn (a shared
machine drifts by more than some of the differences): each figure is the median over the rounds, and
each ratio the median of the rounds' ratios, printed with their range.

    python benchmarks/cpu.py [--models smollm2,qwen2.5-coder-1.5b] [--levels avx2,amx] [--no-hf] [--rounds 3]
                             [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.common import Workload, have, machine, make_workload, run_engine, save_json  # noqa: E402
from infera.engine.llm_engine import LLMEngine  # noqa: E402
from infera.kernels import supported_levels  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402
from infera.loader.model_store import MODELS, resolve  # noqa: E402
from infera.profiler.hardware import calibrate  # noqa: E402

COLUMNS = ("decode", "pp512", "batch-16", "batch-64")


def workloads(tokenizer) -> dict[str, Workload]:
    return {"single": make_workload(tokenizer, "single", 1, 512, 512, 128, seed=1),
            "batch-16": make_workload(tokenizer, "batch-16", 16, 64, 128, 64, seed=0),
            "batch-64": make_workload(tokenizer, "batch-64", 64, 64, 128, 64, seed=0)}


def figures(run, w: dict[str, Workload], repeats: int = 3, batches: bool = True) -> dict[str, float]:
    """The four columns from ``run(workload) -> timings`` (a peer's or infera's): decode is the median
    of ``repeats`` single-stream runs, pp512 the best of their prefills."""
    single = w["single"]
    runs = [run(single) for _ in range(repeats)]
    out = {"decode": (single.output_len - 1) / statistics.median(r["decode_s"] for r in runs),
           "pp512": single.prompt_tokens / min(r["prefill_s"] for r in runs)}
    for name in ("batch-16", "batch-64"):
        out[name] = w[name].output_tokens / run(w[name])["seconds"] if batches else float("nan")
    return out


def infera_row(path: Path, level: str, w: dict[str, Workload], threads: int) -> dict[str, float]:
    os.environ["INFERA_CPU_ISA"] = level
    engine = LLMEngine(model=str(path), kv_cache_memory="2GiB", enable_prefix_caching=False)
    torch.set_num_threads(threads)
    run_engine(engine, Workload("warm-up", [w["single"].prompts[0][:32]], 4))
    row = figures(lambda wl: run_engine(engine, wl), w)
    row["dtype"] = str(engine.config.torch_dtype).removeprefix("torch.")
    del engine
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2," + ",".join(n for n in MODELS if n.endswith("1.5b")),
                        help="comma list: smollm2 (bundled) and short names of `infera models`")
    parser.add_argument("--levels", default=",".join(supported_levels()),
                        help="ISA levels to run infera at (default: every level this CPU supports)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (infera and llama.cpp)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--llama-avx2", type=Path, default=Path(".venv/llama-avx2"),
                        help="llama-cpp-python built for AVX2 only (a pip --target folder; skipped if absent)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure infera and the llama.cpp peers this many times in turn (medians, ranges)")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = calibrate(torch.device("cpu")).memory_bandwidth
    print(f"machine: {machine()}\nISA levels: {', '.join(supported_levels())}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s ({args.threads} threads)")
    builds: dict[str, str] = {}
    if have("llama_cpp"):
        from benchmarks.peers import llama_cpp_features

        builds["llama.cpp"] = llama_cpp_features()
        if (args.llama_avx2 / "llama_cpp").is_dir():
            builds["llama.cpp avx2"] = llama_cpp_features(args.llama_avx2)
    avx2_build = "llama.cpp avx2" in builds
    for label, features in builds.items():
        print(f"{label}: built for {features}")
    print()
    report: dict[str, dict] = {}
    for name in args.models.split(","):
        path = default_model_path() if name == "smollm2" else resolve(name)
        size = path.stat().st_size
        w = workloads(LLMEngine(model=str(path), kv_cache_memory="16MiB").tokenizer)
        print(f"== {path.name} ({size / 2**20:.0f} MiB)")
        print(f"{'engine':<26} {'dtype':>8} " + " ".join(f"{c:>9}" for c in COLUMNS) + f" {'bound':>6}")
        rows: dict[str, dict[str, float]] = {}

        def show(label: str, row: dict[str, float], note: str = "") -> None:
            row["bound"] = size * row["decode"] / bandwidth
            print(f"{label + note:<26} {row.get('dtype', ''):>8} " + " ".join(f"{row[c]:>9.1f}" for c in COLUMNS)
                  + f" {row['bound']:>6.0%}", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            measures = {f"infera {level}": lambda level=level: infera_row(path, level, w, args.threads)
                        for level in args.levels.split(",")}
            if have("llama_cpp"):
                from benchmarks.peers import llama_cpp_quantize, run_llama_cpp, run_llama_cpp_build

                runs = {"llama.cpp": run_llama_cpp}
                if avx2_build:
                    runs["llama.cpp avx2"] = lambda *a: run_llama_cpp_build(args.llama_avx2, *a)
                files = {"": path}
                if name == "smollm2":
                    files[" Q4_0"] = llama_cpp_quantize(path, Path(tmp) / "q4_0.gguf")
                for suffix, file in files.items():
                    for label, run in runs.items():
                        measures[label + suffix] = lambda run=run, file=file: figures(
                            lambda wl: run(file, wl, args.threads), w)
            else:
                print("llama.cpp: llama-cpp-python is not installed (make bench installs it)")
            rounds: dict[str, list[dict[str, float]]] = {label: [] for label in measures}
            for i in range(args.rounds):
                for label, measure in measures.items():
                    rounds[label].append(measure())
                    show(label, rounds[label][-1], f" ({i + 1}/{args.rounds})" if args.rounds > 1 else "")
        for label, measured in rounds.items():
            rows[label] = {c: statistics.median(r[c] for r in measured) for c in COLUMNS}
            rows[label].update({"dtype": measured[0].get("dtype", ""), "rounds": measured})
        if args.rounds > 1:
            print(f"medians of {args.rounds} rounds:")
            for label in rounds:
                show(label, rows[label])
        if not args.no_hf:
            from benchmarks.peers import run_hf

            pad = w["single"].prompts[0][0]
            rows["HF transformers"] = figures(lambda wl: run_hf(path, wl, torch.float32, pad), w, repeats=1,
                                             batches=False)
            rows["HF transformers"]["dtype"] = "float32"
            show("HF transformers", rows["HF transformers"])
        for level in args.levels.split(","):
            r = rows[f"infera {level}"]
            peers = ["llama.cpp avx2" if level == "avx2" and avx2_build else "llama.cpp"]
            peers += [p + " Q4_0" for p in peers]
            for peer in (p for p in peers if p in rows):
                ratios = {c: sorted(a[c] / b[c] for a, b in zip(r["rounds"], rows[peer]["rounds"])) for c in COLUMNS}
                r.setdefault("ratios", {})[peer] = ratios
                print(f"infera {level} / {peer}: " + ", ".join(
                    f"{c} {statistics.median(v):.2f}x" + (f" ({v[0]:.2f}-{v[-1]:.2f})" if len(v) > 1 else "")
                    for c, v in ratios.items()))
        print()
        report[path.name] = {"size": size, "rows": rows}
    save_json(args.json, {"machine": machine(), "bandwidth": bandwidth, "threads": args.threads, "llama.cpp": builds,
                          "date": time.strftime("%Y-%m-%d"), "models": report})


if __name__ == "__main__":
    main()
