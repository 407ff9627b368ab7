"""The packed-weight product alone (``gemm`` of the native module) at one ISA level, on the shapes of
the bundled model (SmolLM2-135M, Q4_1) and Qwen2.5-Coder-1.5B (Q4_K, Q6_K), for 1 to 512 activation
rows; optionally against the same kernels built from another git revision (``--baseline REF``),
the two timed interleaved in one process (medians of ``--repeats`` rounds), so a shared machine's
noise hits both alike. ``--copies N`` cycles through N copies of each weight, so that (for N large
enough) the weights stream from memory as a model's layers do, instead of staying in cache.

    python benchmarks/quant_gemm_micro.py [--level avx2] [--baseline main] [--rows 1,16,64,512] [--copies 40]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from infera.kernels import COMPILER_FLAGS, load_cpu_extension  # noqa: E402
from infera.quant.gguf_blocks import pack_blocks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = [  # (GGUF type, out_features, in_features, where)
    ("Q4_1", 1536, 576, "smollm2 gate/up"),
    ("Q4_1", 576, 1536, "smollm2 down"),
    ("Q8_0", 49152, 576, "smollm2 lm head"),
    ("Q4_K", 1536, 1536, "qwen1.5b q/o"),
    ("Q4_K", 8960, 1536, "qwen1.5b gate/up"),
    ("Q6_K", 1536, 8960, "qwen1.5b down"),
    ("Q6_K", 151936, 1536, "qwen1.5b lm head"),
]
SCALE_FIELDS = {"Q8_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}  # byte offsets of a block's fp16 scales


def random_blocks(type_name: str, rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Raw GGUF blocks of random bytes with fp16 scales of sane size."""
    values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    raw = torch.randint(0, 256, (rows, k // values, size), dtype=torch.uint8, generator=g).numpy()
    for offset in SCALE_FIELDS[type_name]:
        s = torch.rand(rows, k // values, generator=g) * 0.01 + 1e-3
        raw[..., offset:offset + 2] = s.half().numpy().view(np.uint8).reshape(rows, -1, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def build_revision(ref: str, level: str) -> ModuleType:
    """The native module of ``infera/csrc`` at git revision ``ref``, built for ``level``."""
    from torch.utils.cpp_extension import load

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True,
                            capture_output=True, text=True).stdout.strip()
    src = Path(tempfile.gettempdir()) / f"infera-csrc-{commit}"  # (kept: the build is cached by its paths)
    if not src.exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "infera/csrc"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
    sources = [str(p) for p in sorted((src / "infera/csrc").glob("*.cpp"))]
    return load(f"infera_cpu_{level}_{commit}", sources, extra_cflags=["-O3", *COMPILER_FLAGS[level], "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def seconds(module: ModuleType, x: torch.Tensor, ws: list[torch.Tensor], layout, n: int, budget_s: float,
            clock) -> float:
    """Median time of one product by ``clock``, over calls (through the weights ``ws`` in turn) filling
    about ``budget_s``."""
    times = []
    while sum(times) < budget_s or len(times) < 3:
        start = clock()
        for w in ws:
            module.gemm(x, w, layout, n)
        times.append((clock() - start) / len(ws))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", default="avx2", help="ISA level to build and run (default avx2)")
    parser.add_argument("--baseline", default=None, help="git revision whose kernels to time alongside")
    parser.add_argument("--rows", default="1,16,64,512", help="activation rows (comma list)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads; with 1 the clock is the thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    parser.add_argument("--shapes", default=None, help="indices into the shape list (comma list; default all)")
    parser.add_argument("--copies", type=int, default=1,
                        help="copies of each weight to cycle through (e.g. 40: larger than the caches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    modules = {"new": load_cpu_extension(args.level)}
    if args.baseline:
        modules = {"old": build_revision(args.baseline, args.level), **modules}
    g = torch.Generator().manual_seed(0)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    print(f"level {args.level}, {args.threads} threads, {args.dtype} activations; GMAC/s by "
          f"{'CPU' if args.threads == 1 else 'wall'} time (median of "
          f"{args.repeats} interleaved rounds)")
    print(f"{'type':<5} {'N':>5} {'K':>5} {'where':<17} {'rows':>4} " + " ".join(f"{k:>8}" for k in modules)
          + ("  new/old" if args.baseline else "") + (f"  ({args.copies} weight copies)" if args.copies > 1 else ""))
    for type_name, n, k, where in shapes:
        packed = pack_blocks(random_blocks(type_name, n, k, g), type_name, k, n)
        ws = [packed.data] + [packed.data.clone() for _ in range(args.copies - 1)]
        lay = packed.layout
        layouts = {name: m.Layout(lay.encoding, k, lay.scale_group, lay.num_scale_arrays, lay.has_min, lay.offset,
                                  lay.sub_scales)
                   for name, m in modules.items()}
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=g).to(getattr(torch, args.dtype))
            ys = {name: m.gemm(x, packed.data, layouts[name], n) for name, m in modules.items()}  # (warm-up)
            if args.baseline and not torch.equal(ys["old"], ys["new"]):
                err = (ys["old"].float() - ys["new"].float()).abs().max() / ys["old"].float().abs().max()
                print(f"  (new != old: max |diff| / max |y| = {err:.2e})")
            budget = 0.2
            rounds = {name: [] for name in modules}
            for _ in range(args.repeats):
                for name, m in modules.items():
                    rounds[name].append(seconds(m, x, ws, layouts[name], n, budget, clock))
            gmacs = {name: rows * n * k / statistics.median(t) / 1e9 for name, t in rounds.items()}
            line = f"{type_name:<5} {n:>5} {k:>5} {where:<17} {rows:>4} " + " ".join(f"{v:>8.1f}" for v in gmacs.values())
            if args.baseline:
                line += f"  {gmacs['new'] / gmacs['old']:>6.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
