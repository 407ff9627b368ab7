"""int4 weights with groups along the output channels of each input channel (per-IC groups).

Activation outliers live in a few input channels; grouping each input channel's weights over
``group_size`` consecutive output channels gives such a channel scales of its own instead of
letting it stretch the scale of every output row it touches (Rethinking Channel Dimensions, 2023).
``w[n, k] = s[n // g, k] * q[n, k] + m[n // g, k]``. ``group_size`` (default 128) is lowered to the
largest power of two >= 64 dividing out_features.

The kernel multiplies the unscaled quants with ``x * s[group]`` (requantized per group) and adds
``x . m[group]``. Stored: ``qweight`` uint8 ``[N, K / 2]`` (nibbles as in int4), ``scales`` and
``mins`` fp16 ``[N / g, K]``.
"""
from __future__ import annotations

from typing import Any

import torch

from infera.quant.int4 import fit_group, minmax_int4
from infera.quant.layout import Q4, BlockLayout, nibbles, pack_rows, unnibble
from infera.quant.method import PackedWeight, Quantizer


class Int4ICQuantizer(Quantizer):
    name = "int4_ic"

    def __init__(self, group_size: int = 128):
        if group_size < 64 or group_size & (group_size - 1):
            raise ValueError(f"int4_ic group_size must be a power of two >= 64, got {group_size}")
        self.group_size = group_size

    def options(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def group(self, out_features: int) -> int:
        return fit_group(self.group_size, out_features, 64)

    def check(self, out_features: int, in_features: int) -> None:
        super().check(out_features, in_features)
        if out_features % 64:
            raise ValueError(f"int4_ic: out_features must be a multiple of 64, got {out_features}")

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        groups = out_features // self.group(out_features)
        return {"qweight": ((out_features, in_features // 2), torch.uint8),
                "scales": ((groups, in_features), torch.float16), "mins": ((groups, in_features), torch.float16)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        g = self.group(n)
        q, scale, minimum = minmax_int4(weight.float().reshape(n // g, g, k), dim=1)
        return {"qweight": nibbles(q.reshape(n, k)).reshape(n, k // 2), "scales": scale.reshape(n // g, k),
                "mins": minimum.reshape(n // g, k)}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unnibble(tensors["qweight"].reshape(tensors["qweight"].shape[0], -1, 16)).float()
        n, k = q.shape
        groups = tensors["scales"].shape[0]
        w = q.reshape(groups, n // groups, k) * tensors["scales"].float()[:, None] + tensors["mins"].float()[:, None]
        return w.reshape(n, k)

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        qweight = tensors["qweight"]
        n, k = qweight.shape[0], qweight.shape[1] * 2
        layout = BlockLayout(Q4, k, num_scale_arrays=0)
        packed = pack_rows(layout, qweight.reshape(n, k // 32, 16), [])
        scales, mins = tensors["scales"].float().contiguous(), tensors["mins"].float().contiguous()
        return PackedWeight(packed, layout, out_features, ic_scale=scales, ic_min=mins, ic_group=n // scales.shape[0])
