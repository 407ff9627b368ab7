"""Paged-attention kernels: PyTorch implementations (the reference, and the fallback) plus the
native CPU kernel for short queries (csrc/paged_attention.cpp) where it compiled; CUDA tensors go to the
Triton kernels of :mod:`infera.layers.triton_attention` (prefill there too unless
``INFERA_PREFILL_ATTENTION=torch`` picks PyTorch's SDPA).

An int8 cache stores ``round(x / s)`` with ``s = max|x| / 127`` per token and head, a 16-bit cache
under float32 activations K and V rounded to float16 or bfloat16; every reader sees the stored
values, fresh K/V included, so results do not depend on whether a prefix came from the cache.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from infera.kernels import load_cpu_extension

if TYPE_CHECKING:
    from infera.layers.attention import LayerKVCache

PREFILL_BACKENDS = ("triton", "torch")
PREFILL_BACKEND = os.environ.get("INFERA_PREFILL_ATTENTION", "triton")  # prefill attention on CUDA
if PREFILL_BACKEND not in PREFILL_BACKENDS:
    raise ValueError(f"INFERA_PREFILL_ATTENTION must be triton or torch, got {PREFILL_BACKEND!r}")


NATIVE_QUERY_DTYPES = (torch.float32, torch.bfloat16)
HALF_CACHE_DTYPES = (torch.float16, torch.bfloat16)  # caches of any native query dtype


def native_cache(kv: LayerKVCache, dtype: torch.dtype) -> bool:
    """Whether the native CPU kernels serve queries (and K/V) of ``dtype`` from this cache."""
    return dtype in NATIVE_QUERY_DTYPES and (kv.quantized or kv.k.dtype == dtype or kv.k.dtype in HALF_CACHE_DTYPES)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: (int8 values, float32 scales of shape x.shape[:-1])."""
    scale = x.float().abs().amax(dim=-1).clamp_(min=1e-8) / 127.0
    q = torch.round(x.float() / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def store_kv(kv: LayerKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write token ``i``'s K/V into flat slot ``slot_mapping[i]`` (block * block_size + offset).

    Slot -1 skips a token (the padded rows of a CUDA-graph batch; not on the PyTorch fallback)."""
    if not k.is_cuda and native_cache(kv, k.dtype) and (ext := load_cpu_extension()):
        ext.store_kv(kv.k, kv.v, k, v, slot_mapping, kv.k_scale, kv.v_scale)
        return
    if not kv.quantized:
        _write_slots(kv.k, kv.v, k, v, slot_mapping)
        return
    (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
    _write_slots(kv.k, kv.v, qk, qv, slot_mapping)
    _write_slots(kv.k_scale, kv.v_scale, sk, sv, slot_mapping)


def as_cached(kv: LayerKVCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh K/V as later readers of the cache see them (dequantized for an int8 cache, rounded to a
    16-bit cache's dtype)."""
    if not kv.quantized:
        return k.to(kv.k.dtype).to(k.dtype), v.to(kv.v.dtype).to(v.dtype)
    return dequantize_int8(*quantize_int8(k), k.dtype), dequantize_int8(*quantize_int8(v), v.dtype)


def _write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if k.is_cuda:
        from infera.layers import triton_attention

        triton_attention.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    rows = k.shape[1:]
    k_cache.view(-1, *rows).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *rows).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(kv: LayerKVCache, block_table: torch.Tensor, context_len: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``context_len`` cached K/V rows of one sequence: [context_len, Hkv, D]."""
    k = kv.k[block_table].flatten(0, 1)[:context_len]
    v = kv.v[block_table].flatten(0, 1)[:context_len]
    if kv.quantized:
        k = dequantize_int8(k, kv.k_scale[block_table].flatten(0, 1)[:context_len], dtype)
        v = dequantize_int8(v, kv.v_scale[block_table].flatten(0, 1)[:context_len], dtype)
    return k.to(dtype), v.to(dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int = 0) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over ``len(k)`` positions: [Tq, Hq, D].
    With ``window`` > 0 the query at position p sees positions (p - window, p] only."""
    n, ctx = q.shape[0], k.shape[0]
    windowed = 0 < window < ctx
    if q.is_cuda and PREFILL_BACKEND == "triton" and not windowed:
        from infera.layers import triton_attention

        return triton_attention.chunk_attention(q, k, v, scale)
    if n == ctx and not windowed:
        mask, causal = None, True
    else:
        mask, causal = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril_(ctx - n), False
        if windowed:
            mask.triu_(ctx - n - window + 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.to(q.dtype).transpose(0, 1).unsqueeze(0),
        v.to(q.dtype).transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def window_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention the last ``len(q)`` positions pay to each of ``len(k)`` positions, summed over
    those queries, the most of any head (causal; float32): [len(k)].  SnapKV's observation window;
    a head that retrieves a position speaks for it (a sum over heads drowns it)."""
    w, ctx, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
    logits = torch.einsum("whd,chd->hwc", q.float(), keys) * scale
    hidden = torch.ones(w, ctx, dtype=torch.bool, device=q.device).triu_(ctx - w + 1)
    return logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1).sum(dim=1).amax(dim=0)


def decode_attention(q: torch.Tensor, kv: LayerKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, query_start: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Short causal queries over paged contexts, batched: q [T, Hq, D] -> [T, Hq, D].

    Sequence ``s`` owns query rows ``query_start[s]:query_start[s + 1]`` (one row each when
    ``query_start`` is None: a decode step), the last positions of its ``context_lens[s]`` tokens.
    With ``window`` > 0 each query sees its last ``window`` positions (a sliding-window layer).
    """
    if q.is_cuda:
        from infera.layers import triton_attention

        if query_start is not None:
            raise ValueError("multi-token queries go through prefill attention on CUDA")
        return triton_attention.decode_attention(q, kv, block_tables, context_lens, scale, window=window)
    if not q.is_cuda and native_cache(kv, q.dtype) and (ext := load_cpu_extension()):
        return ext.paged_attention(q, kv.k, kv.v, kv.k_scale, kv.v_scale, block_tables, query_start, context_lens,
                                   scale, window)
    return decode_attention_reference(q, kv, block_tables, context_lens, scale, query_start, window)


def decode_attention_reference(q: torch.Tensor, kv: LayerKVCache, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float,
                               query_start: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """:func:`decode_attention` in PyTorch: one padded SDPA call for single-token queries,
    else one call per sequence over its gathered context."""
    if query_start is not None:
        out = torch.empty_like(q)
        for s, (a, b) in enumerate(zip(query_start[:-1].tolist(), query_start[1:].tolist())):
            k, v = gather_kv(kv, block_tables[s], int(context_lens[s]), q.dtype)
            out[a:b] = prefill_attention(q[a:b], k, v, scale, window)
        return out
    k, v = kv.k[block_tables].flatten(1, 2), kv.v[block_tables].flatten(1, 2)  # [B, L, Hkv, D]
    if kv.quantized:
        k = dequantize_int8(k, kv.k_scale[block_tables].flatten(1, 2), q.dtype)
        v = dequantize_int8(v, kv.v_scale[block_tables].flatten(1, 2), q.dtype)
    position = torch.arange(k.shape[1], device=q.device)
    mask = position < context_lens[:, None]
    if window:
        mask &= position >= context_lens[:, None] - window
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out.squeeze(2)
