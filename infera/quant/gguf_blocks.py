"""GGUF block formats run natively: Q8_0, Q4_0 and Q4_1 as they are, Q4_K as 4-bit blocks of 32.

A GGUF file loads with its quantized tensors kept packed (:class:`GGUFConfig`, the default for
GGUF models, as in llama.cpp): each block of 32 inputs keeps its quants and fp16 scale. Q4_K
super-blocks become Q4_1-style blocks (scale ``d * sc``, min ``-dmin * m``, rounded to fp16:
relative error <= 2.5e-4 on the scales). Other quantized types (Q5_*, Q6_K, Q2_K, Q3_K, IQ*)
are requantized to Q8_0 at load (error <= 1/254 of a block's largest weight); F32/F16/BF16
tensors stay float. Stored tensors of these formats are raw GGUF block bytes ``[rows, bytes]``.

The same blocks serve as quantizers of float models (``--quantization q8_0|q4_0|q4_1``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infera.layers.linear import float_linear
from infera.quant.base import QuantizationConfig, QuantizeMethodBase
from infera.quant.layout import Q4, Q8, BlockLayout, pack_rows
from infera.quant.method import PackedWeight, Quantizer, set_packed

logger = logging.getLogger(__name__)

FLOAT_TYPES = {"F32", "F16", "BF16"}
NATIVE_TYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32


def qtype(name: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {name}") from None


@dataclass
class GGUFTensor:
    """A GGUF tensor as stored: ``raw`` is ``uint8 [rows, bytes per row]`` of ``type_name`` blocks."""

    raw: np.ndarray
    type_name: str
    shape: tuple[int, int]  # (rows, columns) as the model sees the matrix

    def dequantize(self) -> torch.Tensor:
        import gguf

        try:
            w = gguf.quants.dequantize(self.raw, qtype(self.type_name))
        except NotImplementedError:
            raise ValueError(f"unsupported GGUF tensor type {self.type_name}") from None
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.shape)

    def narrow_rows(self, start: int, length: int) -> GGUFTensor:
        return GGUFTensor(self.raw[start:start + length], self.type_name, (length, self.shape[1]))


def quantize_blocks(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """Raw GGUF blocks of a float matrix (gguf's reference quantizer)."""
    import gguf

    return gguf.quants.quantize(weight.float().numpy(), qtype(type_name))


def _q4_k_to_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks (256 values) -> Q4_1 blocks of 32 with the same values (scales in fp16)."""
    rows = raw.shape[0]
    sb = raw.reshape(rows, -1, 144)
    d = sb[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = sb[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = sb[..., 4:16].astype(np.uint8)
    qs = sb[..., 16:144].reshape(rows, -1, 4, 32)
    sc = np.empty(s.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    # sub-block 2c: low nibbles of chunk c, 2c + 1: high nibbles -> values [rows, n, 8, 32]
    values = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1, 8, 32)
    q4 = values[..., :16] | (values[..., 16:] << 4)  # Q4_1 order: byte i = value i | value i + 16
    scale = (d * sc).astype(np.float16).view(np.uint8).reshape(rows, -1, 8, 2)
    minimum = (-dmin * mn).astype(np.float16).view(np.uint8).reshape(rows, -1, 8, 2)
    return np.concatenate([scale, minimum, q4.astype(np.uint8)], axis=3).reshape(rows, -1)


def to_native(t: GGUFTensor, name: str = "") -> GGUFTensor:
    """``t`` in one of the natively run block types (Q4_K converted, others requantized to Q8_0)."""
    if t.type_name in NATIVE_TYPES or t.type_name in FLOAT_TYPES:
        return t
    if t.type_name == "Q4_K":
        return GGUFTensor(_q4_k_to_q4_1(t.raw), "Q4_1", t.shape)
    logger.info("%s: %s has no native kernel here; requantizing it to Q8_0", name or "tensor", t.type_name)
    return GGUFTensor(quantize_blocks(t.dequantize(), "Q8_0"), "Q8_0", t.shape)


def block_layout(type_name: str, in_features: int) -> BlockLayout:
    if type_name == "Q8_0":
        return BlockLayout(Q8, in_features, offset=128)
    if type_name == "Q4_0":
        return BlockLayout(Q4, in_features, offset=8)
    if type_name == "Q4_1":
        return BlockLayout(Q4, in_features, num_scale_arrays=2, has_min=True)
    raise ValueError(f"GGUF type {type_name} has no native kernel (native: {', '.join(NATIVE_TYPES)})")


def pack_blocks(raw: torch.Tensor, type_name: str, in_features: int, out_features: int) -> PackedWeight:
    """Raw blocks ``uint8 [rows, nb * block bytes]`` -> the kernel's packed weight."""
    layout = block_layout(type_name, in_features)
    b = raw.reshape(raw.shape[0], in_features // 32, NATIVE_TYPES[type_name])
    half = lambda i: b[..., i:i + 2].contiguous().view(torch.float16)[..., 0]  # noqa: E731
    if type_name == "Q8_0":
        packed = pack_rows(layout, b[..., 2:] ^ 0x80, [half(0)])  # int8 -> u8 (+128)
    elif type_name == "Q4_0":
        packed = pack_rows(layout, b[..., 2:], [half(0)])
    else:
        packed = pack_rows(layout, b[..., 4:], [half(0), half(2)])
    return PackedWeight(packed, layout, out_features)


class GGUFBlockQuantizer(Quantizer):
    """Requantize float weights to a GGUF block type. Stored: ``qweight`` = raw blocks."""

    def __init__(self, block_type: str = "Q8_0"):
        block_type = block_type.upper()
        if block_type not in NATIVE_TYPES:
            raise ValueError(f"GGUF block type must be one of {', '.join(NATIVE_TYPES)}, got {block_type!r}")
        self.block_type = block_type
        self.name = block_type.lower()

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        return {"qweight": ((out_features, in_features // 32 * NATIVE_TYPES[self.block_type]), torch.uint8)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": torch.from_numpy(quantize_blocks(weight, self.block_type))}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raw = tensors["qweight"].numpy()
        return GGUFTensor(raw, self.block_type, (raw.shape[0], raw.shape[1] // NATIVE_TYPES[self.block_type] * 32)
                          ).dequantize()

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        raw = tensors["qweight"]
        return pack_blocks(raw, self.block_type, raw.shape[1] // NATIVE_TYPES[self.block_type] * 32, out_features)


class GGUFLinearMethod(QuantizeMethodBase):
    """A GGUF tensor kept in its file's format: packed blocks, or float for F32/F16/BF16 tensors.

    The parameter is created empty and takes its type from the first tensor loaded into it; a fused
    layer whose parts differ in type is converted to Q8_0 (``weight.type_name`` records the type).
    """

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int], bias: bool,
                       params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        weight.weight_loader = self.weight_loader
        weight.type_name = None
        layer.register_parameter("weight", weight)
        self.output_sizes, self.in_features, self.params_dtype = list(output_sizes), in_features, params_dtype

    def weight_loader(self, param: nn.Parameter, loaded: GGUFTensor | torch.Tensor, shard: int | None = None) -> None:
        rows = sum(self.output_sizes)
        size = rows if shard is None else self.output_sizes[shard]
        start = 0 if shard is None else sum(self.output_sizes[:shard])
        if isinstance(loaded, torch.Tensor):
            loaded = GGUFTensor(loaded.float().numpy(), "F32", tuple(loaded.shape))
        if loaded.shape != (size, self.in_features):
            raise ValueError(f"shape mismatch: expected {(size, self.in_features)}, checkpoint {loaded.shape}")
        loaded = to_native(loaded)
        kind = "float" if loaded.type_name in FLOAT_TYPES else loaded.type_name
        if param.type_name is None:  # first part: allocate for the whole layer
            param.type_name = kind
            param.data = (torch.empty(rows, self.in_features, dtype=self.params_dtype) if kind == "float" else
                          torch.empty(rows, self.in_features // 32 * NATIVE_TYPES[kind], dtype=torch.uint8))
        elif param.type_name != kind:
            logger.info("fused layer parts of types %s and %s: storing it as Q8_0", param.type_name, kind)
            current = (param.data.float() if param.type_name == "float" else
                       GGUFTensor(param.data.numpy(), param.type_name, (rows, self.in_features)).dequantize())
            param.data = torch.from_numpy(quantize_blocks(current, "Q8_0"))
            param.type_name = "Q8_0"
        if param.type_name == "float":
            data = (torch.from_numpy(np.asarray(loaded.raw, dtype=np.float32)).reshape(loaded.shape)
                    if loaded.type_name == "F32" else loaded.dequantize())
        elif loaded.type_name == param.type_name:
            data = torch.from_numpy(np.ascontiguousarray(loaded.raw))
        else:
            data = torch.from_numpy(quantize_blocks(loaded.dequantize(), param.type_name))
        param.data.narrow(0, start, size).copy_(data)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        if weight.type_name == "float" or getattr(weight, "packed", None) is not None:
            return
        set_packed(layer, pack_blocks(weight.data, weight.type_name, self.in_features, sum(self.output_sizes)))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = getattr(layer.weight, "packed", None)
        return float_linear(x, layer.weight, bias) if packed is None else packed.matmul(x, bias)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        packed = getattr(layer.weight, "packed", None)
        return F.embedding(ids, layer.weight) if packed is None else packed.rows(ids, self.params_dtype)


class GGUFConfig(QuantizationConfig):
    """A GGUF model run on its own quantized tensors (every linear layer and the embeddings)."""

    name = "gguf"

    def get_quant_method(self, layer: nn.Module) -> QuantizeMethodBase | None:
        from infera.layers.embed_head import VocabEmbedding
        from infera.layers.linear import Linear

        return GGUFLinearMethod() if isinstance(layer, (Linear, VocabEmbedding)) else None
