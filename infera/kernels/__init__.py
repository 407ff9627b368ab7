"""Native kernels: C++ sources in ``infera/csrc`` compiled for this machine on first use.

``load_cpu_extension(name)`` builds ``csrc/{name}.cpp`` with ``-O3 -march=native -fopenmp``
through ``torch.utils.cpp_extension`` (cached under ``~/.cache/torch_extensions``; the first
build takes about half a minute) and returns the module, or None where no compiler works,
in which case callers fall back to their PyTorch path. ``INFERA_NO_EXTENSIONS=1`` forces that.
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
def load_cpu_extension(name: str) -> ModuleType | None:
    if os.environ.get("INFERA_NO_EXTENSIONS") == "1":
        return None
    from torch.utils.cpp_extension import load

    source = CSRC / f"{name}.cpp"
    # torch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))).hexdigest()[:16]
    try:
        logger.info("loading native kernels %s (compiled on first use)", name)
        return load(f"infera_{name}", [str(source)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DINFERA_HEADERS_{headers}"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: stay on the PyTorch path
        logger.warning("native kernels %s unavailable, using PyTorch fallbacks: %s", name, str(e).splitlines()[0])
        return None


def cpu_kernels(name: str, x) -> ModuleType | None:
    """The native module ``name`` if tensor ``x`` lives on the CPU and the module built, else None."""
    return load_cpu_extension(name) if x.device.type == "cpu" else None
