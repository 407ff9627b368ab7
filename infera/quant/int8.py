"""int8 weights, one scale per output channel, round-to-nearest (symmetric).

Stored: ``qweight`` int8 ``[N, K]``, ``scales`` fp16 ``[N]`` (``max |w_row| / 127``).
Runs on the block kernel as 8-bit quants with one scale for the whole row.
"""
from __future__ import annotations

import torch

from infera.quant.layout import Q8, BlockLayout, pack_rows
from infera.quant.method import PackedWeight, Quantizer


class Int8Quantizer(Quantizer):
    name = "int8"
    threshold = 0.0  # no outlier decomposition (see llm_int8)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float16)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-8).half()
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["qweight"].float() * tensors["scales"].float()[:, None]

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        q = tensors["qweight"]
        n, k = q.shape
        layout = BlockLayout(Q8, k, scale_group=k // 32, offset=128)
        u8 = (q.view(torch.uint8) ^ 0x80).reshape(n, k // 32, 32)  # int8 + 128
        return PackedWeight(pack_rows(layout, u8, [tensors["scales"].reshape(n, 1)]), layout, out_features,
                            threshold=self.threshold)
