"""LLM.int8()-style mixed decomposition: int8 weights (one scale per output channel) multiplied
with int8 activations, except the outlier input features (|x| above a threshold, 6.0 as in the
paper), which are computed in float.

The weights are those of :mod:`infera.quant.int8` (same stored tensors). Outliers are found per
activation row at run time: an input whose magnitude would blow up its block's int8 scale is left
out of the int8 product and added back as ``x_k * W[:, k]``.
"""
from __future__ import annotations

from typing import Any

from infera.quant.int8 import Int8Quantizer


class LLMInt8Quantizer(Int8Quantizer):
    name = "llm_int8"

    def __init__(self, threshold: float = 6.0):
        if threshold <= 0:
            raise ValueError(f"llm_int8 threshold must be > 0, got {threshold}")
        self.threshold = float(threshold)

    def options(self) -> dict[str, Any]:
        return {"threshold": self.threshold}
