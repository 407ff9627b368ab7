"""The native paged-attention kernel alone (``paged_attention`` of the native module) at one ISA
level, on decode steps of a batch (one query row per sequence) over random paged caches of each
KV dtype, against PyTorch's SDPA over the same cache (``decode_attention_reference``, the
fallback) and optionally the kernel built from another git revision (``--baseline REF``); all timed
interleaved in one process by thread CPU time (medians of ``--repeats`` rounds).

    python benchmarks/attention_micro.py [--level avx2] [--baseline main] [--seqs 64] [--context 130]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import torch  # noqa: E402

from benchmarks.quant_gemm_micro import build_revision  # noqa: E402
from infera.kernels import load_cpu_extension  # noqa: E402
from infera.layers import paged_attention as pa  # noqa: E402
from infera.layers.attention import LayerKVCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", default="avx2", help="ISA level to build and run (default avx2)")
    parser.add_argument("--baseline", default=None, help="git revision whose kernel to time alongside")
    parser.add_argument("--seqs", type=int, default=64, help="sequences in the batch (one query row each)")
    parser.add_argument("--context", type=int, default=130, help="tokens in each sequence's cache")
    parser.add_argument("--heads", default="9,3,64",
                        help="query heads, KV heads, head size (default: SmolLM2-135M's)")
    parser.add_argument("--layers", type=int, default=30, help="calls per step (the model's layers)")
    parser.add_argument("--kv-cache-dtypes", default="float32,float16,bfloat16,int8", help="comma list")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hq, hkv, d = (int(v) for v in args.heads.split(","))
    kernels = {"native": load_cpu_extension(args.level)}
    if args.baseline:
        kernels = {"baseline": build_revision(args.baseline, args.level), **kernels}
    block = 16
    blocks = args.seqs * -(-args.context // block)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.seqs, hq, d, generator=g)
    tables = torch.randperm(blocks, generator=g).view(args.seqs, -1)
    lens = torch.full((args.seqs,), args.context)
    print(f"level {args.level}, 1 thread; {args.seqs} sequences x {args.context} tokens, heads {hq}/{hkv} x {d}, "
          f"float32 queries; ms per step of {args.layers} calls (thread CPU time, median of {args.repeats})")
    print(f"{'KV cache':<9} " + " ".join(f"{k:>9}" for k in (*kernels, "pytorch")) + "  native/pytorch"
          + ("  native/baseline" if args.baseline else ""))
    for name in args.kv_cache_dtypes.split(","):
        dtype = getattr(torch, name)
        int8 = dtype == torch.int8
        kv = LayerKVCache(*(torch.zeros(blocks, block, hkv, d, dtype=dtype) for _ in range(2)),
                          *((torch.ones(blocks, block, hkv) for _ in range(2)) if int8 else ()))
        k, v = (torch.randn(blocks * block, hkv, d, generator=g) for _ in range(2))
        pa.store_kv(kv, k, v, torch.arange(blocks * block))
        runs = {kind: (lambda m=m: m.paged_attention(q, kv.k, kv.v, kv.k_scale, kv.v_scale, tables, None, lens, 0.125))
                for kind, m in kernels.items()}
        runs["pytorch"] = lambda: pa.decode_attention_reference(q, kv, tables, lens, 0.125)
        for kind, run in list(runs.items()):
            try:
                run()
            except RuntimeError:  # a baseline without this cache dtype
                del runs[kind]
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        for _ in range(args.repeats):
            for kind, run in runs.items():
                start = time.thread_time()
                for _ in range(args.layers):
                    run()
                times[kind].append(time.thread_time() - start)
        ms = {kind: statistics.median(t) * 1e3 for kind, t in times.items()}
        line = (f"{name:<9} " + " ".join(f"{ms[kind]:>9.2f}" if kind in ms else f"{'-':>9}" for kind in (*kernels, "pytorch"))
                + f"  {ms['pytorch'] / ms['native']:>13.2f}x")
        if "baseline" in ms:
            line += f"  {ms['baseline'] / ms['native']:>15.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
