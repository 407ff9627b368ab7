"""The packed layout the native block kernels (``csrc/quant_gemm.cpp``) multiply with.

Every quantized format of infera ends here: a weight ``[N, K]`` becomes ``uint8 [N', row_bytes]``
(N rounded up to 16), tiles of 16 rows interleaved for VNNI dot products, each followed by its
fp16 scales and int8 sub-scales. The formats differ only by :class:`BlockLayout` (encoding, scale
group, scale arrays, offset, sub-scales). Quants come in as "block bytes": for 8-bit encodings the
32 values of each block of 32 inputs; for 4-bit ones GGUF's 16 bytes per block (byte ``i`` holds
value ``i`` in its low and ``i + 16`` in its high nibble); for 5- and 6-bit ones those nibbles and
then the high bits (:func:`bit_planes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from infera.kernels import cpu_isa, load_cpu_extension

Q8, Q4, T2, Q5, Q6 = 0, 1, 2, 3, 4  # encodings: a byte, a nibble, two trits, 5 or 6 bits per weight
BLOCK_BYTES = {Q8: 32, Q4: 16, T2: 16, Q5: 20, Q6: 24}  # quant bytes per row and block
# int8 sub-scales multiplying the fp16 scales: none, per block (one per scale array), or two of
# scale array 0 per block (values 0-15 and 16-31)
SUB_NONE, SUB_BLOCK, SUB_HALF = 0, 1, 2
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
    """How one packed row reads: ``value = s0 * (q - offset) [+ s1]`` (Q8, Q4, Q5, Q6; s1 when
    ``has_min``) or ``s0 * t1 + s1 * t2`` (T2), with one fp16 scale per ``scale_group`` blocks of 32
    inputs, times the block's int8 sub-scales where ``sub_scales`` says (SUB_BLOCK: s0 and s1 by one
    each; SUB_HALF: s0 by one for values 0-15, by another for 16-31)."""

    encoding: int
    in_features: int
    scale_group: int = 1
    num_scale_arrays: int = 1
    has_min: bool = False
    offset: int = 0
    sub_scales: int = SUB_NONE

    @property
    def num_blocks(self) -> int:
        return self.in_features // BLOCK

    @property
    def quant_bytes(self) -> int:
        return self.num_blocks * BLOCK_BYTES[self.encoding]

    @property
    def num_sub_scales(self) -> int:
        """int8 sub-scales per block."""
        return {SUB_NONE: 0, SUB_BLOCK: self.num_scale_arrays, SUB_HALF: 2}[self.sub_scales]

    @property
    def activation_block(self) -> int:
        """Inputs per int8 activation scale in the kernels: a block, or with sub-scales a scale group
        (csrc/quant_gemm.h, Activations)."""
        return BLOCK * (self.scale_group if self.sub_scales != SUB_NONE else 1)

    @property
    def row_bytes(self) -> int:
        return (self.quant_bytes + 2 * self.num_scale_arrays * (self.num_blocks // self.scale_group)
                + self.num_sub_scales * self.num_blocks)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.row_bytes / self.in_features

    def native(self):
        """The kernel's view of this layout (built once per layer)."""
        return require_kernels("block layout").Layout(self.encoding, self.in_features, self.scale_group,
                                                      self.num_scale_arrays, self.has_min, self.offset,
                                                      self.sub_scales)


def pack_rows(layout: BlockLayout, block_bytes: torch.Tensor, scales: list[torch.Tensor],
              sub_scales: list[torch.Tensor] = ()) -> torch.Tensor:
    """Packed weight ``uint8 [N padded to 16, row_bytes]`` from block bytes ``[N, nb, 16, 20, 24 or
    32]``, the scale arrays (``[N, nb / scale_group]`` each, stored as fp16) and the sub-scales
    (``[N, nb]`` each, integers stored as int8).

    Rows go in tiles of 16: for each block of 32 inputs, vector ``v`` holds bytes ``4v..4v+3`` of the
    16 rows side by side; the tile's scale arrays follow as ``[array][scale index][row]``, then its
    sub-scales as ``[sub-scale][block][row]``.
    """
    if len(scales) != layout.num_scale_arrays or len(sub_scales) != layout.num_sub_scales:
        raise ValueError(f"layout wants {layout.num_scale_arrays} scale arrays and {layout.num_sub_scales} "
                         f"sub-scales, got {len(scales)} and {len(sub_scales)}")
    n, nb, width = block_bytes.shape
    pad = -n % TILE
    q = torch.nn.functional.pad(block_bytes.to(torch.uint8), (0, 0, 0, 0, 0, pad))
    tiles = (n + pad) // TILE
    parts = [q.reshape(tiles, TILE, nb, width // 4, 4).permute(0, 2, 3, 1, 4).reshape(tiles, -1)]
    for s in scales:
        s = torch.nn.functional.pad(s.to(torch.float16).reshape(n, -1), (0, 0, 0, pad))
        parts.append(s.reshape(tiles, TILE, -1).transpose(1, 2).contiguous().view(torch.uint8).reshape(tiles, -1))
    for s in sub_scales:
        s = torch.nn.functional.pad(s.to(torch.int8).reshape(n, nb), (0, 0, 0, pad))
        parts.append(s.reshape(tiles, TILE, nb).transpose(1, 2).contiguous().view(torch.uint8).reshape(tiles, -1))
    packed = torch.cat(parts, dim=1).reshape(tiles * TILE, -1)
    if packed.shape[1] != layout.row_bytes:
        raise ValueError(f"packed rows have {packed.shape[1]} bytes, layout wants {layout.row_bytes}")
    return packed.contiguous()


def nibbles(values: torch.Tensor) -> torch.Tensor:
    """Values 0..15 ``[N, K]`` -> GGUF-order nibble bytes ``[N, K / 32, 16]``."""
    v = values.to(torch.uint8).reshape(values.shape[0], -1, 2, 16)
    return v[:, :, 0] | (v[:, :, 1] << 4)


def bit_planes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Values ``0..2**bits - 1`` ``[N, K]`` (bits 4, 5 or 6) -> block bytes ``[N, K / 32, 16 + ...]``:
    the GGUF-order nibbles of the low 4 bits, then the high bits. Byte ``i`` (0-3) of the high bits
    holds those of values ``4p + i`` (p = 0..3): 5 bits: value ``4p + i``'s in bit p, ``16 + 4p + i``'s
    in bit 4 + p; 6 bits: value ``4p + i``'s in bits 2p, 2p + 1, and ``16 + 4p + i``'s so in byte 4 + i.
    (The kernels rebuild a vector of quants from the nibbles with a shift and a mask per plane.)"""
    values = values.to(torch.uint8)
    low = nibbles(values & 15)
    if bits == 4:
        return low
    n, nb = low.shape[:2]
    high = (values >> 4).reshape(n, nb, 2, 4, 4).to(torch.int32)  # [.., half, p, i]
    p = torch.arange(4).reshape(4, 1)
    if bits == 5:
        shifts = torch.stack([p, p + 4])  # [half, p, 1]
        planes = (high << shifts).sum(dim=(2, 3))
    else:
        planes = (high << (2 * p)).sum(dim=3).reshape(n, nb, 8)
    return torch.cat([low, planes.to(torch.uint8)], dim=2)


def unnibble(block_bytes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nibbles`: ``[N, nb, 16]`` -> values ``[N, nb * 32]`` (uint8)."""
    lo, hi = block_bytes & 15, block_bytes >> 4
    return torch.cat([lo, hi], dim=2).reshape(block_bytes.shape[0], -1)
