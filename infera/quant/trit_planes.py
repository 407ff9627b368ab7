"""Ternary trit-planes (PTQTP): ``w ~ a1 * t1 + a2 * t2`` with ``t1, t2`` in {-1, 0, 1}.

Fitted progressively per group of ``group_size`` weights along each output row: the first plane
ternarizes the weights (threshold 0.7 * mean |w|, least-squares scale), the second the residual;
then ``iterations`` rounds alternate between the least-squares scales of both planes (a 2 x 2
system per group) and the best trit pair of every weight for those scales, each
round lowering the error (up to the fp16 rounding of the scales). ``group_size`` (default 128) is lowered to the largest
power of two >= 32 dividing in_features. Inference multiplies no weights: the kernel takes
``t + 1`` in {0, 1, 2} as unsigned bytes.

Stored: ``qweight`` uint8 ``[N, K / 2]`` (nibble = (t1 + 1) | (t2 + 1) << 2, in int4's order),
``alpha1`` and ``alpha2`` fp16 ``[N, K / g]``.
"""
from __future__ import annotations

from typing import Any

import torch

from infera.quant.int4 import fit_group
from infera.quant.layout import T2, BlockLayout, nibbles, pack_rows, unnibble
from infera.quant.method import PackedWeight, Quantizer

def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trits and least-squares scale of each group (last dim) of ``w``."""
    delta = 0.7 * w.abs().mean(dim=-1, keepdim=True)
    t = torch.sign(w) * (w.abs() > delta)
    scale = (w * t).sum(-1, keepdim=True) / (t * t).sum(-1, keepdim=True).clamp_min(1)
    return t, scale


def best_trits(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trit pair minimizing ``(w - a1 t1 - a2 t2)^2`` for every weight: for each t2 the best t1
    is ``w - a2 t2`` over ``a1`` rounded into [-1, 1] (a convex quadratic in t1)."""
    a1_safe = torch.where(a1.abs() > 1e-12, a1, torch.full_like(a1, 1e-12))
    best = None
    for t2 in (-1.0, 0.0, 1.0):
        r = w - a2 * t2
        t1 = torch.round(r / a1_safe).clamp_(-1, 1)
        err = (r - a1 * t1).square_()
        if best is None:
            best, best_t1, best_t2 = err, t1, torch.full_like(w, t2)
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_t1 = torch.where(better, t1, best_t1)
            best_t2 = torch.where(better, t2, best_t2)
    return best_t1, best_t2


def fit_trit_planes(w: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two trit planes and their scales for groups ``w [..., g]``; scales are fp16-rounded."""
    t1, a1 = ternarize(w)
    t2, a2 = ternarize(w - a1 * t1)
    for _ in range(iterations):
        # scales: least squares for fixed trits (2 x 2 normal equations per group)
        s11, s22, s12 = (t1 * t1).sum(-1, keepdim=True), (t2 * t2).sum(-1, keepdim=True), (t1 * t2).sum(-1, keepdim=True)
        b1, b2 = (w * t1).sum(-1, keepdim=True), (w * t2).sum(-1, keepdim=True)
        det = s11 * s22 - s12 * s12
        ok = det.abs() > 1e-6
        a1 = torch.where(ok, (b1 * s22 - b2 * s12) / det.where(ok, torch.ones_like(det)), a1)
        a2 = torch.where(ok, (b2 * s11 - b1 * s12) / det.where(ok, torch.ones_like(det)), a2)
        a1, a2 = a1.half().float(), a2.half().float()
        t1, t2 = best_trits(w, a1, a2)
    return t1, t2, a1.half(), a2.half()


class TritPlaneQuantizer(Quantizer):
    name = "trit_planes"

    def __init__(self, group_size: int = 128, iterations: int = 6):
        if group_size < 32 or group_size & (group_size - 1):
            raise ValueError(f"trit_planes group_size must be a power of two >= 32, got {group_size}")
        if iterations < 1:
            raise ValueError(f"trit_planes iterations must be >= 1, got {iterations}")
        self.group_size, self.iterations = group_size, iterations

    def options(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "iterations": self.iterations}

    def group(self, in_features: int) -> int:
        return fit_group(self.group_size, in_features, 32)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        groups = in_features // self.group(in_features)
        return {"qweight": ((out_features, in_features // 2), torch.uint8),
                "alpha1": ((out_features, groups), torch.float16), "alpha2": ((out_features, groups), torch.float16)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        g = self.group(k)
        w = weight.float().reshape(n, k // g, g)
        t1, t2, a1, a2 = fit_trit_planes(w, self.iterations)
        codes = ((t1 + 1) + 4 * (t2 + 1)).to(torch.uint8).reshape(n, k)
        return {"qweight": nibbles(codes).reshape(n, k // 2), "alpha1": a1.reshape(n, -1), "alpha2": a2.reshape(n, -1)}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = unnibble(tensors["qweight"].reshape(tensors["qweight"].shape[0], -1, 16))
        n, k = codes.shape
        g = k // tensors["alpha1"].shape[1]
        t1 = ((codes & 3).float() - 1).reshape(n, k // g, g)
        t2 = ((codes >> 2).float() - 1).reshape(n, k // g, g)
        return (tensors["alpha1"].float()[..., None] * t1 + tensors["alpha2"].float()[..., None] * t2).reshape(n, k)

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        qweight = tensors["qweight"]
        n, k = qweight.shape[0], qweight.shape[1] * 2
        g = k // tensors["alpha1"].shape[1]
        layout = BlockLayout(T2, k, scale_group=g // 32, num_scale_arrays=2, offset=1)
        packed = pack_rows(layout, qweight.reshape(n, k // 32, 16), [tensors["alpha1"], tensors["alpha2"]])
        return PackedWeight(packed, layout, out_features)
