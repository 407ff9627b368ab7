"""The quant method shared by every weight format: a :class:`Quantizer` says how a float matrix
becomes stored tensors and how those are packed for the kernels; :class:`QuantizedLinearMethod`
runs it either on float weights as they load (``--quantization``) or on stored tensors read from a
quantized checkpoint (``infera quantize`` output).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from infera.quant.base import QuantizationConfig, QuantizeMethodBase
from infera.quant.layout import BlockLayout, require_kernels


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class PackedWeight:
    """A weight as the native kernel multiplies with it (see ``csrc/quant_gemm.cpp``)."""

    data: torch.Tensor  # uint8 [out_features rounded up to 16, row_bytes]
    layout: BlockLayout
    out_features: int
    threshold: float = 0.0  # LLM.int8(): inputs above it stay out of the int8 product
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # exact CSR term
    ic_scale: torch.Tensor | None = None  # per-IC groups: [groups, in_features] scales and mins
    ic_min: torch.Tensor | None = None
    ic_group: int = 0

    def __post_init__(self) -> None:
        self.native = self.layout.native()
        self._gemm = require_kernels("packed weights").gemm
        self._extra = (*(self.sparse or (None, None, None)), self.ic_scale, self.ic_min, self.ic_group)

    @property
    def nbytes(self) -> int:
        extra = [*(self.sparse or ()), self.ic_scale, self.ic_min]
        return self.data.numel() + sum(t.numel() * t.element_size() for t in extra if t is not None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for ``x [..., in_features]`` (float32 or bfloat16 run as they are).
        Called once per layer and token step: kept to the fewest Python operations."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype not in KERNEL_DTYPES:
            x2 = x2.float()
        y = self._gemm(x2, self.data, self.native, self.out_features, bias, self.threshold, *self._extra)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def head(self, rows: int) -> PackedWeight:
        """The first ``rows`` output rows (a multiple of the 16-row tile) as a weight of their own,
        sharing this one's memory: tiles are stored one after another."""
        if rows % 16 or not 0 < rows <= self.out_features:
            raise ValueError(f"head rows must be a multiple of 16 in (0, {self.out_features}], got {rows}")
        if self.sparse is not None:
            raise NotImplementedError("row slices of dense-and-sparse weights")
        return replace(self, data=self.data[:rows], out_features=rows)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized (an embedding lookup)."""
        if self.ic_scale is not None or self.sparse is not None:
            raise NotImplementedError("row lookup of per-IC or dense-and-sparse weights")
        ext = require_kernels("packed weights")
        out = ext.dequantize(self.data, self.native, self.out_features, ids.reshape(-1), dtype)
        return out.view(*ids.shape, -1)


class Quantizer(ABC):
    """One weight format. Stored tensors are what a quantized checkpoint holds (portable, documented
    per format); :meth:`pack` turns them into the kernel's :class:`PackedWeight`."""

    name: ClassVar[str]

    def options(self) -> dict[str, Any]:
        """Settings written to ``quantization_config.json`` and passed back to ``__init__``."""
        return {}

    def check(self, out_features: int, in_features: int) -> None:
        """Raise ValueError if this format cannot hold a weight of this shape."""
        if in_features % 32:
            raise ValueError(f"{self.name}: in_features must be a multiple of 32, got {in_features}")

    @abstractmethod
    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        """Stored tensor name -> (shape, dtype); shape None where it depends on the data."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors of a float weight ``[out_features, in_features]``."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight the stored tensors represent (the reference of the kernels)."""

    @abstractmethod
    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        """The kernel's form of the stored tensors."""


def _store(layer: nn.Module, name: str, tensor: torch.Tensor, loader) -> nn.Parameter:
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = loader
    layer.register_parameter(name, param)
    return param


def set_packed(layer: nn.Module, packed: PackedWeight) -> None:
    """Make ``layer.weight`` the packed bytes (in place, so a tied embedding / LM head shares it)."""
    weight = layer.weight
    weight.data = packed.data
    weight.packed = packed


class QuantizedLinearMethod(QuantizeMethodBase):
    """Linear (or vocabulary) weights in ``quantizer``'s format.

    ``from_checkpoint``: the layer's parameters are the stored tensors, named ``weight`` (the main
    one) or ``weight_<name>`` (``qweight`` -> ``weight``, ``scales`` -> ``weight_scales``, ...).
    Otherwise the layer loads a float ``weight`` and quantizes it once loaded.
    """

    def __init__(self, quantizer: Quantizer, from_checkpoint: bool = False):
        self.quantizer = quantizer
        self.from_checkpoint = from_checkpoint

    @staticmethod
    def param_name(stored: str) -> str:
        return "weight" if stored == "qweight" else f"weight_{stored}"

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        out_features = sum(output_sizes)
        self.quantizer.check(out_features, in_features)
        layer.weight_shape = (out_features, in_features)
        layer.params_dtype = params_dtype
        loader = getattr(layer, "weight_loader", None)
        if not self.from_checkpoint:
            _store(layer, "weight", torch.empty(out_features, in_features, dtype=params_dtype), loader)
            return
        for name, (shape, dtype) in self.quantizer.shapes(out_features, in_features).items():
            if shape is None:  # sized by the checkpoint
                _store(layer, self.param_name(name), torch.empty(0, dtype=dtype), _take_any_shape)
            else:
                _store(layer, self.param_name(name), torch.empty(shape, dtype=dtype), loader)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer.weight, "packed", None) is not None:  # tied to an embedding already packed
            return
        out_features, in_features = layer.weight_shape
        if self.from_checkpoint:
            names = list(self.quantizer.shapes(out_features, in_features))
            tensors = {n: getattr(layer, self.param_name(n)).data for n in names}
            for n in names:
                if n != "qweight":
                    delattr(layer, self.param_name(n))
        else:
            tensors = self.quantizer.quantize(layer.weight.data.float())
        set_packed(layer, self.quantizer.pack(tensors, out_features))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.weight.packed.matmul(x, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return layer.weight.packed.rows(ids, layer.params_dtype)


def _take_any_shape(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.dtype != loaded.dtype:
        raise ValueError(f"dtype mismatch: parameter {param.dtype}, checkpoint {loaded.dtype}")
    param.data = loaded.clone()


class WeightQuantConfig(QuantizationConfig):
    """One quantizer for every linear layer; the vocabulary embedding and LM head (a third of a small
    model's weights, read at every step) in Q8_0, as llama.cpp keeps them."""

    def __init__(self, quantizer: Quantizer, from_checkpoint: bool = False):
        self.quantizer = quantizer
        self.name = quantizer.name
        self.from_checkpoint = from_checkpoint

    def get_quant_method(self, layer: nn.Module) -> QuantizeMethodBase | None:
        from infera.layers.embed_head import VocabEmbedding
        from infera.layers.linear import Linear
        from infera.quant.gguf_blocks import GGUFBlockQuantizer

        if isinstance(layer, Linear):
            return QuantizedLinearMethod(self.quantizer, self.from_checkpoint)
        if isinstance(layer, VocabEmbedding):
            return QuantizedLinearMethod(GGUFBlockQuantizer("Q8_0"), self.from_checkpoint)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **self.quantizer.options()}


def weight_bytes(model: nn.Module) -> int:
    """Memory held by the model's weights (packed ones at their packed size; tied ones once)."""
    total = 0
    for p in model.parameters():
        packed = getattr(p, "packed", None)
        total += packed.nbytes if packed is not None else p.numel() * p.element_size()
    return total
