"""Linear layers whose weights come from a pluggable quant method (vLLM style).

The method (:mod:`infera.quant.base`) creates the weight parameters, post-processes them after
loading and computes the product; :class:`UnquantizedLinearMethod` keeps a float ``weight``.
Layers built inside :func:`infera.quant.base.quantization_context` ask its config for a method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infera.kernels import cpu_kernels
from infera.quant.base import QuantizeMethodBase, current_quant_config


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with float weights; on CPU, bfloat16 decode rows (up to 8) take the native
    weight-streaming kernel (``csrc/float_gemm.cpp``: 1.5-3x faster than oneDNN's bf16 GEMM at 1-4
    rows on a CPU without AMX)."""
    if weight.dtype == torch.bfloat16 and (ext := cpu_kernels(x)):
        return ext.float_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class UnquantizedLinearMethod(QuantizeMethodBase):
    """A float ``weight [out_features, in_features]`` in the model's dtype."""

    float_linear_weight = True

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), in_features, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = getattr(layer, "weight_loader", default_weight_loader)
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return float_linear(x, layer.weight, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


def make_quant_method(layer: nn.Module, quant_method: QuantizeMethodBase | None) -> QuantizeMethodBase:
    """``quant_method`` if given, else what the current quantization config picks, else float."""
    if quant_method is not None:
        return quant_method
    config = current_quant_config()
    return (config.get_quant_method(layer) if config else None) or UnquantizedLinearMethod()


class Linear(nn.Module):
    """``y = x W^T (+ b)``; ``W`` is ``[out_features, in_features]`` as the quant method stores it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_method: QuantizeMethodBase | None = None, output_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_sizes = list(output_sizes or [out_features])
        self.quant_method = make_quant_method(self, quant_method)
        self.quant_method.create_weights(self, in_features, self.output_sizes, bias, torch.get_default_dtype())
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor, or shard ``shard`` into its rows (a row-wise tensor: dim 0 = outputs)."""
        if shard is None:
            default_weight_loader(param, loaded)
            return
        start = sum(self.output_sizes[:shard])
        default_weight_loader(param.data.narrow(0, start, self.output_sizes[shard]), loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class MergedLinear(Linear):
    """Several projections of one input fused into one GEMM (QKV, gate/up).

    Checkpoint shard ``i`` fills rows ``sum(output_sizes[:i])`` onwards.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 quant_method: QuantizeMethodBase | None = None):
        super().__init__(in_features, sum(output_sizes), bias, quant_method, output_sizes)
