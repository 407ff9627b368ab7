"""Paged-attention kernels: PyTorch implementations (the reference, and the fallback) plus the
native CPU decode kernel (csrc/paged_attention.cpp) where it compiled."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from infera.kernels import load_cpu_extension


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write token ``i``'s K/V into flat slot ``slot_mapping[i]`` (block * block_size + offset)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``context_len`` cached K/V rows of one sequence: [context_len, Hkv, D]."""
    k = k_cache[block_table].flatten(0, 1)[:context_len]
    v = v_cache[block_table].flatten(0, 1)[:context_len]
    return k, v


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over ``len(k)`` positions: [Tq, Hq, D]."""
    n, ctx = q.shape[0], k.shape[0]
    if n == ctx:
        mask, causal = None, True
    else:
        mask, causal = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril_(ctx - n), False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.to(q.dtype).transpose(0, 1).unsqueeze(0),
        v.to(q.dtype).transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence over its paged context: q [B, Hq, D] -> [B, Hq, D]."""
    if q.device.type == "cpu" and q.dtype == k_cache.dtype and (ext := load_cpu_extension("paged_attention")):
        return ext.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`decode_attention` by gathering each context into a padded batch for SDPA."""
    k = k_cache[block_tables].flatten(1, 2).to(q.dtype)  # [B, L, Hkv, D]
    v = v_cache[block_tables].flatten(1, 2).to(q.dtype)
    mask = torch.arange(k.shape[1], device=q.device) < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out.squeeze(2)
