"""The packed layout the native block kernels (``csrc/quant_gemm.cpp``) multiply with.

Every quantized format of infera ends here: a weight ``[N, K]`` becomes ``uint8 [N', row_bytes]``
(N rounded up to 16), tiles of 16 rows interleaved for VNNI dot products, each followed by its
fp16 scales. The formats differ only by :class:`BlockLayout` (encoding, scale group, scale arrays,
offset). Quants come in as "block bytes": for 8-bit encodings the 32 values of each block of 32
inputs; for 4-bit ones GGUF's 16 bytes per block (byte ``i`` holds value ``i`` in its low and
``i + 16`` in its high nibble).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from infera.kernels import cpu_isa, load_cpu_extension

Q8, Q4, T2 = 0, 1, 2  # encodings: a byte, a nibble, or two trits per weight
BLOCK = 32
TILE = 16  # output rows the kernels take at once


def kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built."""
    return load_cpu_extension()


def require_kernels(method: str) -> ModuleType:
    ext = kernels()
    if ext is None:
        raise RuntimeError(f"quantization {method!r} needs the native kernels (infera/csrc/quant_gemm.cpp), "
                           f"which could not be compiled here; see the log for the compiler error")
    return ext


def kernel_paths() -> str:
    """Which native products run here, for the engine's log."""
    ext = kernels()
    if ext is None:
        return "native kernels unavailable"
    batches = (f"AMX bf16 tiles from {ext.AMX_MIN_ROWS} rows" if ext.amx_available()
               else "no AMX on this CPU or build")
    return f"native kernels at ISA level {cpu_isa()} ({ext.ISA}): packed-weight products by int8 dot products, {batches}"


@dataclass(frozen=True)
class BlockLayout:
    """How one packed row reads: ``value = s0 * (q - offset) [+ s1]`` (Q8, Q4; s1 when ``has_min``)
    or ``s0 * t1 + s1 * t2`` (T2), with one scale per ``scale_group`` blocks of 32 inputs."""

    encoding: int
    in_features: int
    scale_group: int = 1
    num_scale_arrays: int = 1
    has_min: bool = False
    offset: int = 0

    @property
    def num_blocks(self) -> int:
        return self.in_features // BLOCK

    @property
    def quant_bytes(self) -> int:
        return self.num_blocks * (BLOCK if self.encoding == Q8 else BLOCK // 2)

    @property
    def row_bytes(self) -> int:
        return self.quant_bytes + 2 * self.num_scale_arrays * (self.num_blocks // self.scale_group)

    def native(self):
        """The kernel's view of this layout (built once per layer)."""
        return require_kernels("block layout").Layout(self.encoding, self.in_features, self.scale_group,
                                                      self.num_scale_arrays, self.has_min, self.offset)


def pack_rows(layout: BlockLayout, block_bytes: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
    """Packed weight ``uint8 [N padded to 16, row_bytes]`` from block bytes ``[N, nb, 32 or 16]`` and
    the scale arrays (``[N, nb / scale_group]`` each, stored as fp16).

    Rows go in tiles of 16: for each block of 32 inputs, vector ``v`` holds bytes ``4v..4v+3`` of the
    16 rows side by side; the tile's scale arrays follow as ``[array][scale index][row]``.
    """
    if len(scales) != layout.num_scale_arrays:
        raise ValueError(f"layout wants {layout.num_scale_arrays} scale arrays, got {len(scales)}")
    n, nb, width = block_bytes.shape
    pad = -n % TILE
    q = torch.nn.functional.pad(block_bytes.to(torch.uint8), (0, 0, 0, 0, 0, pad))
    tiles = (n + pad) // TILE
    parts = [q.reshape(tiles, TILE, nb, width // 4, 4).permute(0, 2, 3, 1, 4).reshape(tiles, -1)]
    for s in scales:
        s = torch.nn.functional.pad(s.to(torch.float16).reshape(n, -1), (0, 0, 0, pad))
        parts.append(s.reshape(tiles, TILE, -1).transpose(1, 2).contiguous().view(torch.uint8).reshape(tiles, -1))
    packed = torch.cat(parts, dim=1).reshape(tiles * TILE, -1)
    if packed.shape[1] != layout.row_bytes:
        raise ValueError(f"packed rows have {packed.shape[1]} bytes, layout wants {layout.row_bytes}")
    return packed.contiguous()


def nibbles(values: torch.Tensor) -> torch.Tensor:
    """Values 0..15 ``[N, K]`` -> GGUF-order nibble bytes ``[N, K / 32, 16]``."""
    v = values.to(torch.uint8).reshape(values.shape[0], -1, 2, 16)
    return v[:, :, 0] | (v[:, :, 1] << 4)


def unnibble(block_bytes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nibbles`: ``[N, nb, 16]`` -> values ``[N, nb * 32]`` (uint8)."""
    lo, hi = block_bytes & 15, block_bytes >> 4
    return torch.cat([lo, hi], dim=2).reshape(block_bytes.shape[0], -1)
