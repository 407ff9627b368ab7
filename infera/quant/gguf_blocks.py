"""GGUF block formats run natively: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, from their blocks.

A GGUF file loads with its quantized tensors kept packed (:class:`GGUFConfig`, the default for
GGUF models, as in llama.cpp): every weight keeps its file's value exactly, in infera's tile
layout (``layout.py``) at close to the file's size (bits per weight: Q8_0 8.5, Q4_0 4.5, Q4_1 5.0,
Q5_0 5.5, Q5_1 6.0, Q4_K 4.625, Q5_K 5.625, Q6_K 6.5625). The k-quants keep their two-level scales:
the super-block's fp16 ``d`` (and ``-dmin``) as scale arrays per 8 blocks, the 6-bit (Q4_K, Q5_K:
per block of 32) or 8-bit (Q6_K: per 16 values) sub-scales as int8 sub-scales, multiplied in
float (exact). Other quantized types gguf can read (Q2_K, Q3_K, IQ*...) are requantized to Q8_0
at load (error <= 1/254 of a block's largest weight); F32/F16/BF16 tensors stay float. Stored
tensors of these formats are raw GGUF block bytes ``[rows, bytes]``.

The same blocks serve as quantizers of float models (``--quantization q8_0|q4_0|q4_1``; from Python
``GGUFBlockQuantizer`` takes every native type, the k-quants for rows of multiples of 256).
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
from infera.quant.layout import (Q4, Q5, Q6, Q8, SUB_BLOCK, SUB_HALF, BlockLayout, bit_planes, pack_rows,
                                 unnibble)
from infera.quant.method import PackedWeight, Quantizer, set_packed

logger = logging.getLogger(__name__)

FLOAT_TYPES = {"F32", "F16", "BF16"}
_K = dict(scale_group=8, num_scale_arrays=2, has_min=True, sub_scales=SUB_BLOCK)  # d, -dmin; sc, m per block
LAYOUTS = {  # the natively run types -> their BlockLayout (but in_features)
    "Q8_0": dict(encoding=Q8, offset=128), "Q4_0": dict(encoding=Q4, offset=8),
    "Q4_1": dict(encoding=Q4, num_scale_arrays=2, has_min=True), "Q5_0": dict(encoding=Q5, offset=16),
    "Q5_1": dict(encoding=Q5, num_scale_arrays=2, has_min=True),
    "Q4_K": dict(encoding=Q4, **_K), "Q5_K": dict(encoding=Q5, **_K),
    "Q6_K": dict(encoding=Q6, scale_group=8, offset=32, sub_scales=SUB_HALF),
}
NATIVE_TYPES = tuple(LAYOUTS)


def qtype(name: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {name}") from None


def row_bytes(type_name: str, in_features: int) -> int:
    """Bytes of a row of ``in_features`` values in GGUF type ``type_name``."""
    import gguf

    values, size = gguf.GGML_QUANT_SIZES[qtype(type_name)]
    if in_features % values:
        raise ValueError(f"{type_name} rows are blocks of {values} values; {in_features} is not a multiple")
    return in_features // values * size


def row_values(type_name: str, nbytes: int) -> int:
    """Values in a row of ``nbytes`` bytes of GGUF type ``type_name``."""
    import gguf

    values, size = gguf.GGML_QUANT_SIZES[qtype(type_name)]
    return nbytes // size * values


@dataclass
class GGUFTensor:
    """A GGUF tensor as stored: ``raw`` is ``uint8 [rows, bytes per row]`` of ``type_name`` blocks."""

    raw: np.ndarray
    type_name: str
    shape: tuple[int, int]  # (rows, columns) as the model sees the matrix
    name: str = ""  # in the file (for messages)

    def dequantize(self) -> torch.Tensor:
        import gguf

        try:
            w = gguf.quants.dequantize(self.raw, qtype(self.type_name))
        except NotImplementedError:
            raise ValueError(f"{self.name or 'tensor'}: GGUF type {self.type_name} cannot be read "
                             f"(gguf has no dequantizer for it)") from None
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.shape)


def quantize_blocks(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """Raw GGUF blocks of a float matrix (``[..., in_features]``): gguf's reference quantizer, or
    for the k-quants (which gguf's Python package cannot write) :func:`quantize_k`."""
    import gguf

    w = weight.float().numpy()
    if type_name in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(w.reshape(-1, w.shape[-1]), type_name).reshape(*w.shape[:-1], -1)
    return gguf.quants.quantize(w, qtype(type_name))


def quantize_k(w: np.ndarray, type_name: str) -> np.ndarray:
    """``float32 [rows, K]`` -> Q4_K, Q5_K or Q6_K blocks (round-to-nearest from each sub-block's
    range; llama.cpp searches scales for a lower error: its files are the better quantization)."""
    rows, k = w.shape
    if k % 256:
        raise ValueError(f"{type_name} rows are blocks of 256 values; {k} is not a multiple")
    half = lambda v: v.astype(np.float16)  # noqa: E731
    ratio = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b != 0)  # noqa: E731
    if type_name == "Q6_K":
        x = w.reshape(rows, -1, 16, 16)  # super-block, sub-block of 16
        scale = np.abs(x).max(-1) / 31
        d = half(scale.max(-1, keepdims=True) / 127)
        sc = np.clip(np.rint(ratio(scale, d.astype(np.float32))), -128, 127)
        step = (d.astype(np.float32) * sc)[..., None]
        q = (np.clip(np.rint(ratio(x, np.broadcast_to(step, x.shape))), -32, 31) + 32).astype(np.uint8)
        q = q.reshape(rows, -1, 2, 4, 32)  # [half of 128][chunk of 32][l]
        ql = np.concatenate([q[..., 0, :] & 15 | (q[..., 2, :] & 15) << 4,
                             q[..., 1, :] & 15 | (q[..., 3, :] & 15) << 4], axis=-1)
        qh = sum((q[..., c, :] >> 4) << (2 * c) for c in range(4))
        blocks = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.astype(np.int8).view(np.uint8),
                  d.view(np.uint8)]
    else:
        levels = 15 if type_name == "Q4_K" else 31
        x = w.reshape(rows, -1, 8, 32)
        low = np.minimum(x.min(-1), 0)
        scale = (x.max(-1) - low) / levels
        d, dmin = half(scale.max(-1, keepdims=True) / 63), half(-low.min(-1, keepdims=True) / 63)
        sc = np.clip(np.rint(ratio(scale, d.astype(np.float32))), 0, 63).astype(np.uint8)
        m = np.clip(np.rint(ratio(-low, dmin.astype(np.float32))), 0, 63).astype(np.uint8)
        step = np.broadcast_to((d.astype(np.float32) * sc)[..., None], x.shape)
        shifted = x + (dmin.astype(np.float32) * m)[..., None]
        q = np.clip(np.rint(ratio(shifted, step)), 0, levels).astype(np.uint8)  # [.., sub-block j, l]
        packed_scales = np.concatenate([sc[..., :4] | (sc[..., 4:] >> 4) << 6, m[..., :4] | (m[..., 4:] >> 4) << 6,
                                        (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4], axis=-1)
        qs = (q[..., 0::2, :] & 15) | (q[..., 1::2, :] & 15) << 4  # chunk c: sub-blocks 2c, 2c + 1
        high = [sum((q[..., j, :] >> 4) << j for j in range(8))] if type_name == "Q5_K" else []
        blocks = [d.view(np.uint8), dmin.view(np.uint8), packed_scales, *high, qs.reshape(rows, -1, 128)]
    return np.concatenate([b.astype(np.uint8) for b in blocks], axis=-1).reshape(rows, -1)


def to_native(t: GGUFTensor) -> GGUFTensor:
    """``t`` in one of the natively run block types (other quantized types requantized to Q8_0)."""
    if t.type_name in NATIVE_TYPES or t.type_name in FLOAT_TYPES:
        return t
    w = t.dequantize()
    logger.info("%s: %s has no native kernel here; requantizing it to Q8_0", t.name or "tensor", t.type_name)
    return GGUFTensor(quantize_blocks(w, "Q8_0"), "Q8_0", t.shape, t.name)


def block_layout(type_name: str, in_features: int) -> BlockLayout:
    if type_name not in LAYOUTS:
        raise ValueError(f"GGUF type {type_name} has no native kernel (native: {', '.join(NATIVE_TYPES)})")
    return BlockLayout(in_features=in_features, **LAYOUTS[type_name])


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bits of bytes ``[..., n]`` -> ``[..., count, n]``: entry (j, l) is bit j of byte l."""
    return (qh.unsqueeze(-2) >> torch.arange(count, dtype=torch.uint8).view(count, 1)) & 1


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> ``([..., 8], [..., 8])``."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    return (torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1),
            torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1))


def unpack_blocks(raw: torch.Tensor, type_name: str, in_features: int):
    """Raw blocks ``uint8 [rows, bytes]`` -> (block bytes, fp16 scale arrays, int8 sub-scales) as
    :func:`~infera.quant.layout.pack_rows` takes them for :func:`block_layout`'s layout."""
    n, k = raw.shape[0], in_features
    nb = k // 32
    if type_name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        b = raw.reshape(n, nb, -1)
    else:
        b = raw.reshape(n, k // 256, -1)
    half = lambda i: b[..., i:i + 2].contiguous().view(torch.float16)[..., 0]  # noqa: E731
    if type_name == "Q8_0":
        return b[..., 2:] ^ 0x80, [half(0)], []  # int8 -> u8 (+128)
    if type_name == "Q4_0":
        return b[..., 2:], [half(0)], []
    if type_name == "Q4_1":
        return b[..., 4:], [half(0), half(2)], []
    if type_name in ("Q5_0", "Q5_1"):
        start = 2 if type_name == "Q5_0" else 4  # d (, m), then 32 high bits, then the nibbles
        qh, qs = b[..., start:start + 4], b[..., start + 4:]
        values = unnibble(qs) | (_high_bits(qh, 8).transpose(-1, -2).reshape(n, k) << 4)
        return bit_planes(values, 5), [half(0)] + ([half(2)] if type_name == "Q5_1" else []), []
    if type_name in ("Q4_K", "Q5_K"):  # d, dmin, 6-bit scales, (Q5_K: 32 bytes of high bits), 128 of nibbles
        sc, m = _k_scales(b[..., 4:16])
        qs = b[..., -128:].reshape(n, -1, 4, 1, 32)  # chunk c: sub-block 2c in low, 2c + 1 in high nibbles
        values = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, k)
        if type_name == "Q5_K":  # bit j of byte l: value l of sub-block j
            values |= _high_bits(b[..., 16:48], 8).reshape(n, k) << 4
        return (bit_planes(values, 4 if type_name == "Q4_K" else 5), [half(0), -half(2)],
                [sc.reshape(n, nb), m.reshape(n, nb)])
    if type_name == "Q6_K":  # 128 bytes of nibbles, 64 of 2-bit highs, 16 int8 scales (per 16 values), d
        ql = (b[..., :128].reshape(n, -1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)) & 15
        qh = (b[..., 128:192].reshape(n, -1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
        values = ql.reshape(n, k) | (qh.reshape(n, k) << 4)
        scales = b[..., 192:208].contiguous().view(torch.int8).reshape(n, nb, 2)
        return bit_planes(values, 6), [half(208)], [scales[..., 0], scales[..., 1]]
    raise ValueError(f"GGUF type {type_name} has no native kernel (native: {', '.join(NATIVE_TYPES)})")


def pack_blocks(raw: torch.Tensor, type_name: str, in_features: int, out_features: int) -> PackedWeight:
    """Raw blocks ``uint8 [rows, bytes per row]`` -> the kernel's packed weight."""
    layout = block_layout(type_name, in_features)
    return PackedWeight(pack_rows(layout, *unpack_blocks(raw, type_name, in_features)), layout, out_features)


class GGUFBlockQuantizer(Quantizer):
    """Requantize float weights to a GGUF block type. Stored: ``qweight`` = raw blocks."""

    def __init__(self, block_type: str = "Q8_0"):
        block_type = block_type.upper()
        if block_type not in NATIVE_TYPES:
            raise ValueError(f"GGUF block type must be one of {', '.join(NATIVE_TYPES)}, got {block_type!r}")
        self.block_type = block_type
        self.name = block_type.lower()

    def check(self, out_features: int, in_features: int) -> None:
        row_bytes(self.block_type, in_features)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        return {"qweight": ((out_features, row_bytes(self.block_type, in_features)), torch.uint8)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": torch.from_numpy(quantize_blocks(weight, self.block_type))}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raw = tensors["qweight"].numpy()
        return GGUFTensor(raw, self.block_type, (raw.shape[0], row_values(self.block_type, raw.shape[1]))).dequantize()

    def pack(self, tensors: dict[str, torch.Tensor], out_features: int) -> PackedWeight:
        raw = tensors["qweight"]
        return pack_blocks(raw, self.block_type, row_values(self.block_type, raw.shape[1]), out_features)


class GGUFLinearMethod(QuantizeMethodBase):
    """A GGUF tensor kept in its file's format: packed blocks, or float for F32/F16/BF16 tensors.

    The parameter is created empty and takes its type from the first tensor loaded into it; a fused
    layer whose parts differ in type is converted to Q8_0 (``weight.type_name`` records the type).
    """

    float_linear_weight = True

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
                          torch.empty(rows, row_bytes(kind, self.in_features), dtype=torch.uint8))
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
