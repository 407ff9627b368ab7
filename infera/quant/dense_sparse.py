"""Dense-and-sparse decomposition (SqueezeLLM): the largest-magnitude weights are kept exactly in
a sparse matrix, the rest is quantized to int4 groups (as :mod:`infera.quant.int4`).

Removing the outliers before quantizing shrinks the range each group must cover. The sparse
part holds ``w - dequant(dense)`` at the outlier positions, so those weights are reconstructed
exactly. ``fraction`` (default 0.5%) of each matrix's weights are outliers.

Stored: int4's ``qweight``/``scales``/``mins`` plus CSR ``sparse_indptr`` int32 ``[N + 1]``,
``sparse_indices`` int32 ``[nnz]`` and ``sparse_values`` float32 ``[nnz]``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from infera.quant.int4 import Int4Quantizer
from infera.quant.method import PackedWeight, Quantizer


class DenseSparseQuantizer(Quantizer):
    name = "dense_sparse"

    def __init__(self, fraction: float = 0.005, group_size: int = 128):
        if not 0 < fraction < 0.5:
            raise ValueError(f"dense_sparse fraction must be in (0, 0.5), got {fraction}")
        self.fraction = fraction
        self.dense = Int4Quantizer(group_size)

    def options(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "group_size": self.dense.group_size}

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        return {**self.dense.shapes(out_features, in_features),
                "sparse_indptr": ((out_features + 1,), torch.int32),
                "sparse_indices": (None, torch.int32), "sparse_values": (None, torch.float32)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.float()
        k = max(1, int(w.numel() * self.fraction))
        cutoff = w.abs().flatten().kthvalue(w.numel() - k + 1).values
        outliers = w.abs() >= cutoff
        dense = self.dense.quantize(torch.where(outliers, torch.zeros_like(w), w))
        residual = (w - self.dense.dequantize(dense)) * outliers
        rows, cols = outliers.nonzero(as_tuple=True)  # row-major: CSR order
        indptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
        indptr[1:] = torch.bincount(rows, minlength=w.shape[0]).cumsum(0)
        return {**dense, "sparse_indptr": indptr, "sparse_indices": cols.int(), "sparse_values": residual[rows, cols]}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.dense.dequantize(tensors)
        rows = torch.repeat_interleave(torch.arange(w.shape[0]), tensors["sparse_indptr"].diff().long())
        w[rows, tensors["sparse_indices"].long()] += tensors["sparse_values"].float()
        return w

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        sparse = (tensors["sparse_indptr"].int().contiguous(), tensors["sparse_indices"].int().contiguous(),
                  tensors["sparse_values"].float().contiguous())
        return replace(self.dense.pack(tensors, out_features), sparse=sparse)
