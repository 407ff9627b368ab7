"""Mixture-of-experts decoding on the CPU: infera against llama.cpp and HF transformers on the same
random-weight Mixtral-shaped model, in one run.

No MoE model ships here and none can be downloaded, so the model is built from a config (default:
12 layers, hidden 768, 8 experts of 1024 with top-2 routing: 0.32B parameters, 0.15B of them used
per token), saved with the bundled tokenizer as an HF directory in bfloat16, and written as GGUF by
``infera.loader.gguf_writer`` (BF16 and Q8_0) for llama.cpp and for infera's native GGUF path.

Workloads (greedy, EOS ignored): single stream, a 256-token prompt and 128 new tokens (prefill
tok/s; decode tok/s after the first token, median of 3 runs); batch, 16 requests of 64-128-token
prompts and 64 new tokens each (output tok/s over the whole run).

Rows: infera bf16 (the HF directory) and infera gguf (the Q8_0 file, run natively), llama.cpp on
the BF16 and Q8_0 files (when llama-cpp-python is installed: ``make bench``), HF transformers bf16.

    python benchmarks/moe.py [--layers 12] [--hidden 768] [--experts 8] [--top-k 2] [--expert-size 1024]
                             [--no-hf] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.common import Workload, have, machine, make_workload, run_engine, save_json  # noqa: E402
from infera.engine.llm_engine import LLMEngine  # noqa: E402
from infera.loader.gguf_file import GGUFFile  # noqa: E402
from infera.loader.gguf_writer import write_gguf  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402


def build_model(args: argparse.Namespace, root: Path) -> tuple[Path, int]:
    """The random-weight Mixtral-shaped HF directory and its pad (= EOS) token id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = GGUFFile(default_model_path()).tokenizer_dir()
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    config = AutoConfig.for_model(
        "mixtral", architectures=["MixtralForCausalLM"], vocab_size=49152, hidden_size=args.hidden,
        intermediate_size=args.expert_size, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 192, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # normal(0, 0.02) weights
    path = root / "mixtral"
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {total / 1e9:.2f}B parameters, {(total - experts * (1 - args.top_k / args.experts)) / 1e9:.2f}B "
          f"used per token", flush=True)
    return path, eos


def row(results: dict, label: str, run: Callable[[Workload], dict[str, float]], size_bytes: float, single: Workload,
        batch: Workload, repeats: int = 3) -> None:
    """Measure one engine (``run(workload)`` -> timings: ``repeats`` single streams after a warm-up,
    then one batch) and print its line; one repeat and no warm-up where each run loads the model."""
    if repeats > 1:
        run(Workload("warm-up", [single.prompts[0][:32]], 4))
    singles = [run(single) for _ in range(repeats)]
    b = run(batch)
    results[label] = r = {
        "size_mib": size_bytes / 2**20,
        "prefill_tok_s": single.prompt_tokens / statistics.median(s["prefill_s"] for s in singles),
        "decode_tok_s": (single.output_len - 1) / statistics.median(s["decode_s"] for s in singles),
        "batch_tok_s": batch.output_tokens / b["seconds"]}
    print(f"  {label:<22} {r['size_mib']:6.0f} MiB   prefill {r['prefill_tok_s']:7.1f} tok/s   "
          f"decode {r['decode_tok_s']:6.1f} tok/s   batch-{len(batch.prompts)} {r['batch_tok_s']:7.1f} tok/s", flush=True)


def infera_run(model: Path, **options) -> tuple[Callable[[Workload], dict[str, float]], float]:
    engine = LLMEngine(model=str(model), kv_cache_memory="1GiB", enable_prefix_caching=False, **options)
    return (lambda workload: run_engine(engine, workload)), engine.weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768, help="a multiple of 192 (64-wide heads, 3 per KV head)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1024, help="each expert's intermediate size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers (the slowest row)")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="infera-moe-bench-"))
    results: dict = {"machine": machine(), "config": vars(args)}
    try:
        model, pad_id = build_model(args, root)
        ggufs = {t: write_gguf(model, root / f"mixtral-{t}.gguf", default_model_path(), t) for t in ("BF16", "Q8_0")}
        tokenizer = LLMEngine(model=str(model), kv_cache_memory="16MiB").tokenizer
        single = make_workload(tokenizer, "single", 1, 256, 256, 128)
        batch = make_workload(tokenizer, "batch", 16, 64, 128, 64, seed=1)
        print(f"single stream: 256-token prompt, 128 new tokens; batch: {len(batch.prompts)} requests, "
              f"{batch.prompt_tokens} prompt tokens, 64 new tokens each", flush=True)
        rows: dict = {}
        row(rows, "infera bf16", *infera_run(model, dtype="bfloat16"), single, batch)
        row(rows, "infera gguf Q8_0", *infera_run(ggufs["Q8_0"], quantization="gguf"), single, batch)
        gc.collect()
        if have("llama_cpp"):
            from benchmarks.peers import run_llama_cpp

            for t, gguf in ggufs.items():
                row(rows, f"llama.cpp {t}", lambda w, g=gguf: run_llama_cpp(g, w, args.threads), gguf.stat().st_size,
                    single, batch)
        else:
            print("llama.cpp: llama-cpp-python is not installed (make bench installs it)")
        if not args.no_hf:
            from benchmarks.peers import run_hf

            row(rows, "HF transformers bf16", lambda w: run_hf(model, w, torch.bfloat16, pad_id),
                sum(f.stat().st_size for f in model.glob("*.safetensors")), single, batch, repeats=1)
        results["rows"] = rows
        print("\nratios (infera / peer):")
        for ours, peer in (("infera bf16", "llama.cpp BF16"), ("infera gguf Q8_0", "llama.cpp Q8_0"),
                           ("infera bf16", "HF transformers bf16")):
            if peer in rows:
                a, b = rows[ours], rows[peer]
                print(f"  {ours} / {peer}: prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, decode "
                      f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x, batch {a['batch_tok_s'] / b['batch_tok_s']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
