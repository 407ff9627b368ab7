"""Native kernels: the C++ sources in ``infera/csrc``, built per instruction-set level.

One source tree, one module per ISA level, each compiled with that level's flags (never
``-march=native``), so a build is valid on every CPU of its level and a cache shared between
machines cannot hand AVX-512 code to an AVX2 CPU. The sources pick their vector paths with
``#if`` on the compiler's feature macros; each level has its own paths and a scalar tail.

========  ===================================================================  ==========================
level     compiler flags                                                       CPUs
========  ===================================================================  ==========================
none      none beyond the architecture's baseline (the scalar paths)          any
avx2      x86-64-v3: AVX2, FMA, F16C, BMI2                                     Haswell+, AMD Zen 1-3
avx512    x86-64-v4 + AVX512-VNNI + AVX512-BF16                                AMD Zen 4+, Intel Cooper Lake+
amx       avx512 + AMX-TILE/BF16/INT8                                          Intel Sapphire Rapids+
========  ===================================================================  ==========================

The level is chosen at run time: the highest one this CPU (and kernel, for AMX) supports, or
``INFERA_CPU_ISA=none|avx2|avx512|amx`` to force a lower one (a level the CPU lacks is an
error). ``load_cpu_extension(level)`` builds (about a minute, cached under
``~/.cache/torch_extensions``) and returns a level's module, or None where no compiler works, in
which case callers fall back to their PyTorch path; ``INFERA_NO_EXTENSIONS=1`` forces that.
Builders of one level take turns through a lock the OS releases when its holder dies, so a build
killed midway (which leaves torch's lock file behind) does not hang the next start.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent.parent / "csrc"

ISA_LEVELS = ("none", "avx2", "avx512", "amx")  # lowest first
_AVX2 = ("avx2", "fma", "f16c", "bmi2")
_AVX512 = (*_AVX2, "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16")
CPU_FLAGS = {"none": (), "avx2": _AVX2, "avx512": _AVX512, "amx": (*_AVX512, "amx_tile", "amx_bf16", "amx_int8")}
COMPILER_FLAGS = {
    "none": [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"],
    "amx": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_levels() -> list[str]:
    """The ISA levels this machine runs, lowest first (only ``none`` off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["none"]
    flags = cpu_flags()
    return [level for level in ISA_LEVELS if all(f in flags for f in CPU_FLAGS[level])]


def cpu_isa() -> str:
    """The ISA level the kernels run at: ``INFERA_CPU_ISA`` if set, else the highest supported."""
    levels = supported_levels()
    forced = os.environ.get("INFERA_CPU_ISA", "").strip().lower()
    if not forced:
        return levels[-1]
    if forced not in ISA_LEVELS:
        raise ValueError(f"INFERA_CPU_ISA={forced!r}: expected one of {', '.join(ISA_LEVELS)}")
    if forced not in levels:
        raise ValueError(f"INFERA_CPU_ISA={forced}: this CPU supports only {', '.join(levels)}")
    return forced


def has_bf16_arithmetic() -> bool:
    """Whether the running level computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    return cpu_isa() in ("avx512", "amx")


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build directory for one builder at a time, with a lock the OS drops when its holder
    dies, and clear torch's own lock file if a killed build left it (torch would wait on it forever)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "infera.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():  # every infera builder holds the flock while torch's lock exists
            logger.warning("removing %s, left by a build that was interrupted", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def _build(level: str) -> ModuleType | None:
    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"infera_cpu_{level}"
    sources = [str(p) for p in sorted(CSRC.glob("*.cpp"))]
    # torch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
    try:
        logger.info("loading native kernels for ISA level %s (compiled on first use)", level)
        with build_lock(Path(_get_build_directory(name, verbose=False))):
            return load(name, sources,
                        extra_cflags=["-O3", *COMPILER_FLAGS[level], "-fopenmp", f"-DINFERA_HEADERS_{headers}"],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: stay on the PyTorch path
        errors = [line for line in str(e).splitlines() if "error" in line] or str(e).splitlines()[:1]
        logger.warning("native kernels (%s) unavailable, using PyTorch fallbacks: %s", level, errors[0])
        return None


def load_cpu_extension(level: str | None = None) -> ModuleType | None:
    """The native module of ``level`` (default: :func:`cpu_isa`), or None where it cannot be built."""
    return _load(level, os.environ.get("INFERA_CPU_ISA"), os.environ.get("INFERA_NO_EXTENSIONS") == "1")


@functools.cache  # (called for every kernel: the environment is read, the choice remembered)
def _load(level: str | None, forced: str | None, disabled: bool) -> ModuleType | None:
    if disabled:
        return None
    level = level or cpu_isa()
    if level not in supported_levels():
        raise ValueError(f"ISA level {level} is not supported by this CPU ({', '.join(supported_levels())})")
    module = _build(level)
    if module is not None and level == cpu_isa():
        logger.info("native kernels: ISA level %s (%s; this CPU supports %s)", level, module.ISA,
                    ", ".join(supported_levels()))
    return module


def cpu_kernels(x) -> ModuleType | None:
    """The native module if tensor ``x`` lives on the CPU and the module built, else None."""
    return load_cpu_extension() if x.device.type == "cpu" else None
