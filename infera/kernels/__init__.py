"""Native kernels: C++ sources in ``infera/csrc`` compiled for this machine on first use.

``load_cpu_extension()`` builds every ``csrc/*.cpp`` into one module with ``-O3 -march=native
-fopenmp`` through ``torch.utils.cpp_extension`` (cached under ``~/.cache/torch_extensions``; the
first build takes about a minute) and returns it, or None where no compiler works, in which case
callers fall back to their PyTorch path. ``INFERA_NO_EXTENSIONS=1`` forces that.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@functools.cache
def load_cpu_extension() -> ModuleType | None:
    if os.environ.get("INFERA_NO_EXTENSIONS") == "1":
        return None
    from torch.utils.cpp_extension import load

    sources = [str(p) for p in sorted(CSRC.glob("*.cpp"))]
    # torch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
    try:
        logger.info("loading native kernels (compiled on first use)")
        return load("infera_cpu", sources,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DINFERA_HEADERS_{headers}"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: stay on the PyTorch path
        logger.warning("native kernels unavailable, using PyTorch fallbacks: %s", str(e).splitlines()[0])
        return None


def cpu_kernels(x) -> ModuleType | None:
    """The native module if tensor ``x`` lives on the CPU and the module built, else None."""
    return load_cpu_extension() if x.device.type == "cpu" else None
