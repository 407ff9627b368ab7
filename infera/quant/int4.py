"""int4 weights with groups along the input channels of each output channel (per-OC groups).

Each run of ``group_size`` consecutive weights of an output row shares a scale and a minimum:
``w = s * q + m`` with ``q`` in 0..15 (round-to-nearest, asymmetric). ``group_size`` (default
128) is lowered to the largest power of two >= 32 that divides the layer's in_features.

Stored: ``qweight`` uint8 ``[N, K / 2]`` (per block of 32: byte i holds value i in its low and
value i + 16 in its high nibble, GGUF's order), ``scales`` and ``mins`` fp16 ``[N, K / g]``.
"""
from __future__ import annotations

from typing import Any

import torch

from infera.quant.layout import Q4, BlockLayout, nibbles, pack_rows, unnibble
from infera.quant.method import PackedWeight, Quantizer


def fit_group(group_size: int, size: int, smallest: int) -> int:
    """The largest power-of-two fraction of ``group_size`` (>= ``smallest``) dividing ``size``."""
    g = group_size
    while g >= smallest:
        if size % g == 0:
            return g
        g //= 2
    raise ValueError(f"no group of {smallest}..{group_size} divides {size}")


def minmax_int4(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quants of ``w`` with scale/min taken along ``dim`` (fp16-rounded)."""
    lo, hi = w.amin(dim=dim, keepdim=True), w.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    minimum = lo.half()
    q = torch.round((w - minimum.float()) / scale.float()).clamp(0, 15).to(torch.uint8)
    return q, scale, minimum


class Int4Quantizer(Quantizer):
    name = "int4"

    def __init__(self, group_size: int = 128):
        if group_size < 32 or group_size & (group_size - 1):
            raise ValueError(f"int4 group_size must be a power of two >= 32, got {group_size}")
        self.group_size = group_size

    def options(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def group(self, in_features: int) -> int:
        return fit_group(self.group_size, in_features, 32)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        groups = in_features // self.group(in_features)
        return {"qweight": ((out_features, in_features // 2), torch.uint8),
                "scales": ((out_features, groups), torch.float16), "mins": ((out_features, groups), torch.float16)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        g = self.group(k)
        q, scale, minimum = minmax_int4(weight.float().reshape(n, k // g, g), dim=2)
        return {"qweight": nibbles(q.reshape(n, k)).reshape(n, k // 2), "scales": scale.reshape(n, -1),
                "mins": minimum.reshape(n, -1)}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unnibble(tensors["qweight"].reshape(tensors["qweight"].shape[0], -1, 16)).float()
        n, k = q.shape
        g = k // tensors["scales"].shape[1]
        w = q.reshape(n, k // g, g) * tensors["scales"].float()[..., None] + tensors["mins"].float()[..., None]
        return w.reshape(n, k)

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        qweight = tensors["qweight"]
        n, k = qweight.shape[0], qweight.shape[1] * 2
        g = k // tensors["scales"].shape[1]
        layout = BlockLayout(Q4, k, scale_group=g // 32, num_scale_arrays=2, has_min=True)
        packed = pack_rows(layout, qweight.reshape(n, k // 32, 16), [tensors["scales"], tensors["mins"]])
        return PackedWeight(packed, layout, out_features)
