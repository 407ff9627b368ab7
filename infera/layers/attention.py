"""Paged attention: the layer writes new K/V into cache slots, then attends over the cache.

The model runner describes the flat batch in an :class:`AttentionMetadata` set for the
duration of a forward pass; model code sees only ``(input_ids, positions)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from infera.layers import kivi, paged_attention


@dataclass
class LayerKVCache:
    """One layer's paged K/V: ``[num_blocks, block_size, num_kv_heads, head_dim]`` each, in the
    model's dtype, or int8 with one float32 scale per token and head (``[..., num_kv_heads]``), or
    2-bit codes (``head_dim / 4`` bytes a row) with their parameters and the staging slots' exact
    16-bit keys and values (:mod:`infera.layers.kivi`)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_params: torch.Tensor | None = None  # kivi2: [num_blocks, num_kv_heads, 2, head_dim] (scale, min)
    v_params: torch.Tensor | None = None  # kivi2: [num_blocks, block_size, num_kv_heads, 2, head_dim / group]
    staging: torch.Tensor | None = None  # kivi2: [num_staging_slots, 2 (K, V), block_size, num_kv_heads, head_dim]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def kivi(self) -> bool:
        return self.staging is not None


@dataclass
class PrefillChunk:
    """A multi-token query of one sequence: tokens ``[query_start, query_start + query_len)``
    of the flat batch are slots ``[context_len - query_len, context_len)`` of its block table (its
    positions, unless a KV policy evicted tokens before them)."""

    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor
    # the attention of the chunk's last ``observe`` queries to each cached position, the most of any
    # layer (:func:`paged_attention.window_attention`: summed over the queries, the most of any head)
    observe: int = 0
    scores: torch.Tensor | None = None
    # kivi2: the staging slots (-1: none) of table block 0, then of the blocks from the residual zone's
    # first on (infera.layers.kivi.exact_context)
    stage_slots: list[int] = field(default_factory=list)


@dataclass
class AttentionMetadata:
    """The first ``num_decode_tokens`` tokens are short queries (decode steps, speculative
    verification, small chunks) whose attention runs batched over the paged cache: one token per
    sequence, or ``decode_query_start[s]:decode_query_start[s + 1]`` for sequence ``s``. The rest
    are prefill chunks, one sequence each.  A hybrid KV cache's sliding-window groups have their own
    slots and block tables: ``window_groups[g - 1]`` is KV-cache group ``g``'s metadata."""

    slot_mapping: torch.Tensor
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    decode_query_start: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    window_groups: list[AttentionMetadata] = field(default_factory=list)
    # kivi2: each token's staging row (slot * block_size + offset; -1: none), and each short query's
    # sequence's staging slots as a prefill chunk's ``stage_slots``
    stage_mapping: torch.Tensor | None = None
    decode_stage_slots: torch.Tensor | None = None

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata KV-cache group ``group``'s layers read."""
        return self.window_groups[group - 1] if group else self


_metadata: AttentionMetadata | None = None


@contextmanager
def attention_metadata(meta: AttentionMetadata) -> Iterator[None]:
    global _metadata
    _metadata = meta
    try:
        yield
    finally:
        _metadata = None


def get_attention_metadata() -> AttentionMetadata:
    if _metadata is None:
        raise RuntimeError("attention called outside a model-runner forward pass")
    return _metadata


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads over a paged KV cache (``kv_cache``, a view
    into the pool handed over by the model runner)."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, sliding_window: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window  # > 0: each query sees its last sliding_window cached tokens
        self.kv_cache: LayerKVCache | None = None
        self.kv_group = 0  # its KV-cache group (set by the KV-cache pool)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q``: [T, Hq, D]; ``k``, ``v``: [T, Hkv, D]; returns [T, Hq * D]."""
        meta = get_attention_metadata().for_group(self.kv_group)
        kv = self.kv_cache
        if kv.kivi:
            return kivi.forward(q, k, v, kv, meta, self.scale, self.sliding_window)
        paged_attention.store_kv(kv, k, v, meta.slot_mapping)
        d, window = meta.num_decode_tokens, self.sliding_window
        if not meta.prefills:  # short queries only (every decode step): no output copy
            return paged_attention.decode_attention(q, kv, meta.decode_block_tables, meta.decode_context_lens,
                                                    self.scale, meta.decode_query_start, window).flatten(1)
        out = torch.empty_like(q)
        if d:
            out[:d] = paged_attention.decode_attention(q[:d], kv, meta.decode_block_tables, meta.decode_context_lens,
                                                       self.scale, meta.decode_query_start, window)
        for chunk in meta.prefills:
            s, n = chunk.query_start, chunk.query_len
            if n == chunk.context_len:  # nothing cached before this chunk: attend to the fresh K/V
                ck, cv = paged_attention.as_cached(kv, k[s:s + n], v[s:s + n])
            else:
                ck, cv = paged_attention.gather_kv(kv, chunk.block_table, chunk.context_len, q.dtype)
            out[s:s + n] = paged_attention.prefill_attention(q[s:s + n], ck, cv, self.scale, window)
            if chunk.observe:
                paid = paged_attention.window_attention(q[s + n - chunk.observe:s + n], ck, self.scale)
                torch.maximum(chunk.scores, paid, out=chunk.scores)
        return out.flatten(1)
