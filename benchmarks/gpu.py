"""infera on one CUDA GPU against HF transformers, in one run, on dummy-weight models.

No model files reach the GPU machine, so each model is built from its published config with random
weights (as vLLM's dummy load format does), saved with the bundled tokenizer to a temporary
directory, and loaded from there by both engines.

1. throughput (the nano-vllm benchmark): 256 requests of random token ids, prompt and output lengths
   uniform in 100-1024 (seed 0), temperature 0.6, EOS ignored, on a Qwen3-0.6B-shaped model.
   HF transformers runs the same requests with ``generate`` in left-padded batches of similar
   output lengths (``--hf-batch-size``), each batch to its longest output; only requested tokens count.
2. single-stream decode: one request (``--prompt-len`` prompt, ``--decode-len`` greedy tokens) on
   Qwen3-0.6B and Llama-3-8B shapes, against the roofline bound of infera.profiler (weights and KV
   read once per token; the GPU's published bandwidth and the one measured here).

Targets (issue 9): throughput >= 10x HF; single-stream decode >= 50% of the bandwidth bound.

    python benchmarks/gpu.py [--only throughput|decode] [--decode-models qwen3-0.6b,llama-3-8b]
                             [--enforce-eager] [--prefill-attention triton|torch] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.common import save_json  # noqa: E402
from infera import LLM, SamplingParams  # noqa: E402
from infera.layers import paged_attention  # noqa: E402
from infera.loader.gguf_file import GGUFFile  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402
from infera.profiler import ModelShape, WeightLayout, get_hardware, phase_report  # noqa: E402
from infera.profiler.roofline import BUILTIN_CONFIGS, weight_format  # noqa: E402

# what the shapes in BUILTIN_CONFIGS leave out, from the same published configs
CONFIG_EXTRAS = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def build_dummy_model(name: str, root: Path):
    """A random-weight bfloat16 HF model of a published shape on the GPU, saved (with the bundled
    tokenizer) to ``root / name``; returns (path, model, config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = GGUFFile(default_model_path()).tokenizer_dir()
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    spec = dict(BUILTIN_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, **CONFIG_EXTRAS[name], bos_token_id=eos,
                                  eos_token_id=eos, pad_token_id=eos)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()  # normal(0, 0.02) init
    path = root / name
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    log(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, saved to {path} "
        f"in {time.perf_counter() - started:.0f}s")
    return path, model, config


def nano_vllm_workload(num_requests: int, max_input: int, max_output: int, seed: int = 0):
    """nano-vllm's bench.py: prompts of random ids in [0, 10000], lengths uniform in [100, max]."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input))] for _ in range(num_requests)]
    output_lens = [rng.randint(100, max_output) for _ in range(num_requests)]
    return prompts, output_lens


def infera_llm(path: Path, args: argparse.Namespace, **options) -> LLM:
    return LLM(str(path), dtype="bfloat16", device="cuda", enforce_eager=args.enforce_eager,
               gpu_memory_utilization=args.gpu_memory_utilization, **options)


def run_infera_throughput(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> dict:
    llm.generate([prompts[0]], SamplingParams(max_tokens=16), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(output_lens), (generated, sum(output_lens))
    return {"seconds": seconds, "output_tokens": generated, "tok_s": generated / seconds}


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, do_sample: bool) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    sampling = dict(do_sample=True, temperature=0.6, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   pad_token_id=pad_id, **sampling)


def run_hf_throughput(model, prompts: list[list[int]], output_lens: list[int], batch_size: int, pad_id: int) -> dict:
    """Batches of similar output lengths (kind to HF's static batching); each runs to its longest."""
    order = sorted(range(len(prompts)), key=lambda i: output_lens[i])
    hf_generate(model, [prompts[0]], 8, pad_id, True)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        hf_generate(model, [prompts[i] for i in batch], max(output_lens[i] for i in batch), pad_id, True)
        log(f"  HF batch {b // batch_size + 1}/{-(-len(order) // batch_size)} done")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(output_lens[i] for i in order)
    return {"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds}


def run_infera_decode(llm: LLM, prompt: list[int], decode_len: int) -> dict:
    engine = llm.engine
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    engine.reset_prefix_cache()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=decode_len, ignore_eos=True))
    start = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"prefill_s": first - start, "decode_s": end - first, "tok_s": (decode_len - 1) / (end - first)}


def run_hf_decode(model, prompt: list[int], decode_len: int, pad_id: int) -> dict:
    """Decode time = generate(decode_len) - generate(1) (the prefill and first token)."""
    hf_generate(model, [prompt], 8, pad_id, False)  # warm-up
    times = []
    for n in (1, decode_len):
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf_generate(model, [prompt], n, pad_id, False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"prefill_s": times[0], "decode_s": times[1] - times[0], "tok_s": (decode_len - 1) / (times[1] - times[0])}


def decode_bound(config, name: str, context: int, hardware: list) -> dict[str, float]:
    """Single-stream decode tok/s ceilings (roofline of infera.profiler) on each hardware spec."""
    shape = ModelShape.from_config(config, name)
    layout = WeightLayout.uniform(shape, weight_format("bfloat16"))
    return {hw.description: phase_report(shape, "decode", 1, context, hw, "bfloat16", layout).tok_s_ceiling
            for hw in hardware}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["throughput", "decode"], default=None, help="run one part only")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="run HF on the first N requests only (its tok/s is compared; default: all)")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--decode-models", default="qwen3-0.6b,llama-3-8b")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-len", type=int, default=512)
    parser.add_argument("--hardware", default="h100", help="published spec for the bound (see infera.profiler)")
    parser.add_argument("--enforce-eager", action="store_true", help="infera without CUDA graphs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--prefill-attention", choices=paged_attention.PREFILL_BACKENDS,
                        default=paged_attention.PREFILL_BACKEND, help="infera's prefill attention kernel")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    paged_attention.PREFILL_BACKEND = args.prefill_attention
    device = torch.cuda.get_device_name()
    log(f"{device}, torch {torch.__version__}; infera: CUDA graphs {'off' if args.enforce_eager else 'on'}, "
        f"prefill attention {args.prefill_attention}")
    results: dict = {"device": device, "torch": torch.__version__, "enforce_eager": args.enforce_eager,
                     "prefill_attention": args.prefill_attention}
    root = Path(tempfile.mkdtemp(prefix="infera-gpu-bench-"))
    try:
        if args.only in (None, "throughput"):
            results["throughput"] = throughput(args, root)
        if args.only in (None, "decode"):
            hardware = [get_hardware(args.hardware), get_hardware("local")]
            results["decode"] = {name: decode(args, root, name, hardware) for name in args.decode_models.split(",")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_json(args.json, results)


def throughput(args: argparse.Namespace, root: Path) -> dict:
    prompts, output_lens = nano_vllm_workload(args.requests, args.max_input_len, args.max_output_len)
    path, model, config = build_dummy_model("qwen3-0.6b", root)
    out: dict = {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(output_lens)}
    if not args.no_hf:
        n = args.hf_requests or len(prompts)
        log(f"HF transformers generate: {n} requests in batches of {args.hf_batch_size}")
        out["hf"] = run_hf_throughput(model, prompts[:n], output_lens[:n], args.hf_batch_size, config.pad_token_id)
    del model
    free_gpu()
    llm = infera_llm(path, args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_model_len=4096)
    log(f"infera: {len(prompts)} requests")
    out["infera"] = run_infera_throughput(llm, prompts, output_lens)
    del llm
    free_gpu()
    print(f"\nthroughput, Qwen3-0.6B shape (dummy weights), {out['requests']} requests, {out['prompt_tokens']} prompt "
          f"and {out['output_tokens']} output tokens:")
    for name in ("infera", "hf"):
        if name in out:
            r = out[name]
            print(f"  {name:<8} {r['output_tokens']:>8} tokens in {r['seconds']:8.1f}s = "
                  f"{r['tok_s']:9.1f} output tok/s")
    if "hf" in out:
        out["ratio"] = out["infera"]["tok_s"] / out["hf"]["tok_s"]
        print(f"  infera / HF: {out['ratio']:.1f}x (target >= 10x)\n", flush=True)
    return out


def decode(args: argparse.Namespace, root: Path, name: str, hardware: list) -> dict:
    rng = random.Random(1)
    prompt = [rng.randint(0, 10000) for _ in range(args.prompt_len)]
    path, model, config = build_dummy_model(name, root)
    out: dict = {}
    if not args.no_hf:
        log(f"HF transformers: single-stream decode on {name}")
        out["hf"] = run_hf_decode(model, prompt, args.decode_len, config.pad_token_id)
    del model
    free_gpu()
    llm = infera_llm(path, args, max_num_seqs=8)
    log(f"infera: single-stream decode on {name}")
    out["infera"] = run_infera_decode(llm, prompt, args.decode_len)
    del llm
    free_gpu()
    shutil.rmtree(path, ignore_errors=True)
    out["bound_tok_s"] = decode_bound(config, name, args.prompt_len + args.decode_len // 2, hardware)
    print(f"\nsingle-stream decode, {name} shape (dummy weights, bfloat16), {args.prompt_len}-token prompt, "
          f"{args.decode_len} tokens:")
    for engine in ("infera", "hf"):
        if engine in out:
            print(f"  {engine:<8} {out[engine]['tok_s']:8.1f} tok/s")
    if "hf" in out:
        print(f"  infera / HF: {out['infera']['tok_s'] / out['hf']['tok_s']:.2f}x")
    for hw, bound in out["bound_tok_s"].items():
        print(f"  roofline bound on {hw}: {bound:.0f} tok/s; infera reaches "
              f"{100 * out['infera']['tok_s'] / bound:.0f}% (target >= 50%)")
    print(flush=True)
    return out


if __name__ == "__main__":
    main()
