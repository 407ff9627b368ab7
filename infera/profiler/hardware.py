"""Hardware specs for the roofline: peak memory bandwidth and dense FLOP/s per dtype.

The GPU rows are the vendors' published peaks. Tensor-core figures are *dense*: NVIDIA's
datasheets print the 2:4-sparsity figure and mark it with an asterisk; the dense figure is half.
``fp32`` is the non-tensor (CUDA core) rate, which is also the rate used for element-wise
operators (norms, softmax, RoPE, SiLU). ``local`` is this machine, measured by
:func:`calibrate` with a short micro-benchmark and cached as JSON.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TERA, GIGA = 1e12, 1e9

# torch dtype name -> key of HardwareSpec.flops
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    description: str
    memory_bandwidth: float  # bytes/s
    flops: dict[str, float]  # dense FLOP/s (OP/s for int8) by dtype key: fp32, tf32, bf16, fp16, int8, fp8
    measured: dict[str, float] = field(default_factory=dict)  # calibration extras (copy bandwidth, ...)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a torch dtype name (float32, bfloat16, float16) or a dtype key."""
        key = DTYPE_KEYS.get(dtype, dtype)
        if key not in self.flops:
            raise ValueError(f"hardware {self.name!r} has no {dtype} FLOP/s figure; it has {', '.join(self.flops)}")
        return self.flops[key]


GPUS: dict[str, HardwareSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: HBM3 3.35 TB/s; FP32 67 TFLOPS;
    # TF32 989*, BF16 1,979*, FP16 1,979*, FP8 3,958*, INT8 3,958* TOPS (* with sparsity).
    "h100-sxm": HardwareSpec("h100-sxm", "NVIDIA H100 SXM5 80GB", 3.35e12, {
        "fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA, "fp16": 989.5 * TERA,
        "fp8": 1979 * TERA, "int8": 1979 * TERA}),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: HBM3e 141 GB at 4.8 TB/s; compute as H100 SXM
    # (FP32 67; TF32 989*, BF16/FP16 1,979*, FP8/INT8 3,958* with sparsity).
    "h200": HardwareSpec("h200", "NVIDIA H200 SXM 141GB", 4.8e12, {
        "fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA, "fp16": 989.5 * TERA,
        "fp8": 1979 * TERA, "int8": 1979 * TERA}),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: HBM2e 2,039 GB/s; FP32 19.5 TFLOPS;
    # TF32 156 (312*), BF16/FP16 312 (624*), INT8 624 (1,248*) TOPS. Ampere has no FP8.
    "a100-80gb": HardwareSpec("a100-80gb", "NVIDIA A100 SXM4 80GB", 2.039e12, {
        "fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA, "fp16": 312 * TERA, "int8": 624 * TERA}),
    # NVIDIA L40S datasheet: GDDR6 864 GB/s; FP32 91.6 TFLOPS; TF32 183 (366*), BF16/FP16 362.05 (733*),
    # FP8 733 (1,466*), INT8 733 (1,466*) TOPS.
    "l40s": HardwareSpec("l40s", "NVIDIA L40S 48GB", 864e9, {
        "fp32": 91.6 * TERA, "tf32": 183 * TERA, "bf16": 362.05 * TERA, "fp16": 362.05 * TERA,
        "fp8": 733 * TERA, "int8": 733 * TERA}),
    # NVIDIA Ada GPU architecture whitepaper, appendix table for GeForce RTX 4090: GDDR6X 1,008 GB/s;
    # FP32 82.6 TFLOPS; TF32 82.6; BF16 and FP16 with FP32 accumulate (what PyTorch GEMMs use) 165.2;
    # FP8 with FP32 accumulate 330.3; INT8 660.6 TOPS (all dense; sparse figures are twice these).
    "rtx4090": HardwareSpec("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 1.008e12, {
        "fp32": 82.6 * TERA, "tf32": 82.6 * TERA, "bf16": 165.2 * TERA, "fp16": 165.2 * TERA,
        "fp8": 330.3 * TERA, "int8": 660.6 * TERA}),
}
ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090"}
HARDWARE_NAMES = [*GPUS, "local"]


def cache_path() -> Path:
    root = Path(os.environ.get("INFERA_CACHE_DIR", Path.home() / ".cache" / "infera"))
    return root / "hardware.json"


def get_hardware(name: str, recalibrate: bool = False, device: str | torch.device | None = None) -> HardwareSpec:
    """A spec by name (``h100``, ``l40s``, ... or ``local``); ``local`` calibrates once and caches."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in GPUS:
        return GPUS[key]
    if key == "local":
        return local_hardware(device, recalibrate)
    raise ValueError(f"unknown hardware {name!r}; choose from {', '.join(HARDWARE_NAMES)}")


def _device_signature(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}:{torch.get_num_threads()} threads"


def local_hardware(device: str | torch.device | None = None, recalibrate: bool = False) -> HardwareSpec:
    """This machine's spec (CUDA if available, else the CPU), from the cache or measured now."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    signature = _device_signature(device)
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if signature in cached and not recalibrate:
        return HardwareSpec(**cached[signature])
    logger.info("calibrating %s (memory bandwidth and matmul FLOP/s; a few seconds)", signature)
    spec = calibrate(device, description=signature)
    cached[signature] = asdict(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)
    logger.info("cached in %s: %.1f GB/s, %s", path, spec.memory_bandwidth / GIGA,
                ", ".join(f"{k} {v / GIGA:.0f} GFLOP/s" for k, v in spec.flops.items()))
    return spec


def _best_time(fn, device: torch.device, repeats: int, budget_s: float) -> float:
    """Fastest run of ``fn`` after a warm-up: at least ``repeats`` runs, more while within ``budget_s``
    (the best of many runs filters out other processes' interference), in seconds."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < repeats or (spent < budget_s and runs < 100):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def calibrate(device: torch.device, description: str = "", memory_mib: int | None = None,
              matmul_n: int | None = None, repeats: int = 3, budget_s: float = 1.0) -> HardwareSpec:
    """Measure read bandwidth (sum of a large fp32 tensor), copy bandwidth, and square-matmul
    FLOP/s per dtype (fp32, bf16; fp16 too on CUDA) on ``device``."""
    cuda = device.type == "cuda"
    memory_mib = memory_mib or (2048 if cuda else 512)
    n = matmul_n or (8192 if cuda else 1024)
    with torch.inference_mode():
        x = torch.ones(memory_mib * 2**20 // 4, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        nbytes = x.numel() * 4
        read_bw = nbytes / _best_time(x.sum, device, repeats, budget_s)
        copy_bw = 2 * nbytes / _best_time(lambda: y.copy_(x), device, repeats, budget_s)
        del x, y
        flops: dict[str, float] = {}
        for key, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)] + (
                [("fp16", torch.float16)] if cuda else []):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            flops[key] = 2 * n ** 3 / _best_time(lambda: a @ b, device, repeats, budget_s)
    return HardwareSpec("local", description or _device_signature(device), read_bw, flops,
                        measured={"copy_bandwidth": copy_bw, "threads": torch.get_num_threads(),
                                  "calibrated_at": time.time()})
