"""How a layer gets quantized: a config picks a method per layer; the method owns the weights.

As in vLLM, a :class:`QuantizationConfig` answers ``get_quant_method(layer)`` and the returned
:class:`QuantizeMethodBase` creates the layer's parameters, post-processes them once the checkpoint
is loaded, and computes the layer's product. The config in force while a model is built is set
with :func:`quantization_context`; layers read it with :func:`current_quant_config`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class QuantizeMethodBase(ABC):
    """Parameters and forward of one layer kind (linear layers and vocabulary embeddings)."""

    # apply() is F.linear over ``layer.weight`` whenever that is a float tensor without a packed form,
    # so fused native kernels may take the weight as it is
    float_linear_weight: bool = False

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        """Register the layer's parameters (each with a ``weight_loader``)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn loaded checkpoint tensors into what :meth:`apply` computes with."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)``."""

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``W`` (for vocabulary embeddings)."""
        raise NotImplementedError(f"{type(self).__name__} does not quantize embeddings")


class QuantizationConfig(ABC):
    """A quantization method as configured for one model (``name`` plus its options)."""

    name: str

    @abstractmethod
    def get_quant_method(self, layer: nn.Module) -> QuantizeMethodBase | None:
        """The method for ``layer``, or None to leave it unquantized."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON written beside a quantized checkpoint (``quantization_config.json``)."""
        return {"method": self.name}


_current: QuantizationConfig | None = None


@contextmanager
def quantization_context(config: QuantizationConfig | None) -> Iterator[None]:
    """Layers built inside take their quant method from ``config``."""
    global _current
    previous, _current = _current, config
    try:
        yield
    finally:
        _current = previous


def current_quant_config() -> QuantizationConfig | None:
    return _current
