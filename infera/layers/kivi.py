"""A 2-bit KV cache after KIVI (Liu et al. 2024): keys quantized per channel, values per token.

Keys have a few channels of large magnitude (outlier channels), so a key block is quantized per
channel over its ``block_size`` tokens; values are quantized per token, in groups of ``GROUP``
channels.  Each group has a bfloat16 scale and minimum (asymmetric): ``x ~ min + code * scale``
with codes 0..3, ``scale = (max - min) / 3``.  A row of ``D`` codes takes ``D / 4`` bytes, planar:
byte ``j`` holds channel ``j + i * D / 4`` in bits ``2i, 2i + 1``.

As KIVI keeps its last ``RESIDUAL`` tokens in full precision, a query reads exact (16-bit) keys and
values in its residual zone: its own block and the blocks before it up to ``RESIDUAL`` tokens, and
the first block, whose attention sinks take much of every query's attention (kept exact as IntactKV
keeps its pivot tokens: perplexity on the bundled model +15% without them, +7% with).  Those blocks'
rows wait in staging slots (:mod:`infera.engine.kivi_staging` assigns them); a key block is quantized
once full, from its staged rows.  What a query reads depends on positions and on which blocks are
staged, never on how tokens were batched or chunked.  The native CPU kernels (``csrc/kivi_cache.cpp``,
``csrc/paged_attention.cpp``) implement the PyTorch reference below (codes to the bit, attention
within float rounding).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from infera.kernels import load_cpu_extension
from infera.layers import paged_attention

if TYPE_CHECKING:
    from infera.layers.attention import AttentionMetadata, LayerKVCache

GROUP = 32  # channels of a value group
RESIDUAL = 128  # tokens a query reads exactly: its block and those before it (KIVI's residual)
PARAM_DTYPE = torch.bfloat16
_SHIFTS = (0, 2, 4, 6)


def value_group(head_dim: int) -> int:
    return min(GROUP, head_dim)


def residual_blocks(block_size: int) -> int:
    """Blocks of a query's residual zone: its own and those before it."""
    return max(1, RESIDUAL // block_size)


def stage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The staged rows' dtype: the model's if 16-bit, else float16."""
    return dtype if dtype.itemsize == 2 else torch.float16


def check_head_dim(head_dim: int) -> None:
    if head_dim % 4 or head_dim % value_group(head_dim):
        raise ValueError(f"a kivi2 KV cache needs a head size that is a multiple of 4 and of {GROUP} (or below "
                         f"{GROUP}); got {head_dim}")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..3 [..., D] -> bytes [..., D / 4] (byte j: channels j + i * D / 4 in bits 2i, 2i + 1)."""
    c = codes.to(torch.uint8).unflatten(-1, (4, codes.shape[-1] // 4))
    return c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-2) >> shifts[:, None]) & 3).flatten(-2)


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-bit codes of ``x`` in groups along ``dim``: (codes, params ``[2, ...]``: the groups' scales
    and minimums, ``dim`` kept with size 1)."""
    x = x.float()
    low = x.amin(dim, keepdim=True).to(PARAM_DTYPE).float()
    scale = ((x.amax(dim, keepdim=True) - low) / 3).clamp_(min=1e-8).to(PARAM_DTYPE).float()
    codes = torch.round((x - low) / scale).clamp_(0, 3).to(torch.uint8)
    return codes, torch.stack([scale, low]).to(PARAM_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + low.float()


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value rows [T, H, D] -> (bytes [T, H, D / 4], params [T, H, 2, D / g]) for groups of g channels."""
    g = value_group(v.shape[-1])
    codes, params = quantize(v.unflatten(-1, (-1, g)), -1)  # params [2, T, H, D / g, 1]
    return pack(codes.flatten(-2)), params.squeeze(-1).movedim(0, -2)


def dequantize_values(packed: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: [..., H, D] float32."""
    groups = params.shape[-1]
    codes = unpack(packed).unflatten(-1, (groups, -1))
    return dequantize(codes, params[..., 0, :, None], params[..., 1, :, None]).flatten(-2)


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks [B, bs, H, D] -> (bytes [B, bs, H, D / 4], params [B, H, 2, D]) per channel."""
    codes, params = quantize(k, 1)  # params [2, B, 1, H, D]
    return pack(codes), params.squeeze(2).movedim(0, 2)


def dequantize_keys(packed: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: [B, bs, H, D] float32."""
    return dequantize(unpack(packed), params[:, None, :, 0], params[:, None, :, 1])


def _staged_rows(kv: LayerKVCache, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into ``kv.staging`` (``[slots * 2 * block_size, H, D]``) of the key and value of staging
    rows ``rows`` (slot * block_size + offset)."""
    bs = kv.staging.shape[2]
    key = rows // bs * 2 * bs + rows % bs
    return key, key + bs


def store_kv(kv: LayerKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             stage_mapping: torch.Tensor) -> None:
    """Write token ``i``'s K/V: its value row quantized into slot ``slot_mapping[i]`` and, where its block
    has a staging slot, both rows into staging row ``stage_mapping[i]`` (-1: none); each block whose
    last slot a token fills has its keys quantized from its staged rows, or from the tokens' own rows
    (rounded as staged) where it has none (then all its tokens are among them)."""
    if not k.is_cuda and (ext := load_cpu_extension()) and k.dtype in (torch.float32, torch.bfloat16):
        ext.kivi_store_kv(kv.k, kv.v, kv.k_params, kv.v_params, kv.staging, k, v, slot_mapping, stage_mapping)
        return
    bs, heads, dim = kv.k.shape[1], kv.k.shape[2], k.shape[-1]
    keep = slot_mapping >= 0
    slots, stage = slot_mapping[keep], stage_mapping[keep]
    k, v = k[keep].to(kv.staging.dtype), v[keep]
    packed, params = quantize_values(v)
    kv.v.view(-1, heads, dim // 4)[slots] = packed
    kv.v_params.view(-1, *params.shape[1:])[slots] = params
    staged = stage >= 0
    rows = kv.staging.view(-1, heads, dim)
    key_rows, value_rows = _staged_rows(kv, stage[staged])
    rows[key_rows], rows[value_rows] = k[staged], v[staged].to(rows.dtype)
    ends = (slots % bs == bs - 1).nonzero().flatten()
    if not len(ends):
        return
    offsets = torch.arange(-bs + 1, 1, device=k.device)
    from_stage = stage[ends] >= 0
    staged_keys = rows[_staged_rows(kv, (stage[ends, None] + offsets).clamp(min=0))[0]]
    blocks = torch.where(from_stage[:, None, None, None], staged_keys, k[(ends[:, None] + offsets).clamp(min=0)])
    packed, params = quantize_keys(blocks)
    block_ids = slots[ends] // bs
    kv.k[block_ids] = packed
    kv.k_params[block_ids] = params


def quantized_context(kv: LayerKVCache, table: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized keys and values of positions [0, context_len) of one block table, float32 (the
    keys of a block not yet full are meaningless: every query reads them exactly)."""
    bs = kv.k.shape[1]
    blocks = table[:-(-context_len // bs)]
    k = dequantize_keys(kv.k[blocks], kv.k_params[blocks]).flatten(0, 1)[:context_len]
    v = dequantize_values(kv.v[blocks], kv.v_params[blocks]).flatten(0, 1)[:context_len]
    return k, v


def exact_context(kv: LayerKVCache, stage_slots: list[int], first: int, context_len: int,
                  fresh: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact rows a sequence's queries at positions [first, context_len) may read: (positions,
    keys, values), float32.  ``stage_slots``: the staging slots of table block 0, then of the blocks
    from its residual zone's first on (-1: not staged); ``fresh``: the keys and values of positions
    [first, context_len) just computed (else they are read from staging)."""
    bs = kv.k.shape[1]
    zone = max(0, first // bs - residual_blocks(bs) + 1)
    blocks = {0: stage_slots[0]} | {zone + i: slot for i, slot in enumerate(stage_slots[1:])}
    end = first if fresh is not None else context_len
    pos, keys, values = [], [], []
    for b, slot in sorted(blocks.items()):
        n = min(bs, end - b * bs)
        if slot >= 0 and n > 0:
            pos.append(torch.arange(b * bs, b * bs + n))
            keys.append(kv.staging[slot, 0, :n])
            values.append(kv.staging[slot, 1, :n])
    if fresh is not None:
        pos.append(torch.arange(first, context_len))
        keys.append(fresh[0].to(kv.staging.dtype))
        values.append(fresh[1].to(kv.staging.dtype))
    device = kv.staging.device
    if not pos:
        return torch.empty(0, dtype=torch.long, device=device), kv.staging[0, 0, :0].float(), kv.staging[0, 1, :0].float()
    return torch.cat(pos).to(device), torch.cat(keys).float(), torch.cat(values).float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           block_size: int, scale: float, window: int = 0) -> torch.Tensor:
    """Queries ``q`` [n, Hq, D] at positions [ctx - n, ctx) over the quantized ``k``, ``v`` [ctx, H, D],
    each reading instead the exact rows (``exact``: positions, keys, values) in its residual zone:
    the first block, and its own with the ones before it: [n, Hq, D]."""
    n, ctx = q.shape[0], k.shape[0]
    exact_pos, exact_k, exact_v = exact
    pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    zone = ((pos // block_size - residual_blocks(block_size) + 1) * block_size).clamp(min=0)
    e = exact_pos[None]
    reads_exact = ((e < block_size) | (e >= zone)) & (e <= pos)
    covered = torch.zeros(n, ctx, dtype=torch.bool, device=q.device)
    covered[:, exact_pos] = reads_exact
    t = torch.arange(ctx, device=q.device)[None]
    mask = torch.cat([(t <= pos) & ~covered, reads_exact], dim=1)
    if window:
        mask &= torch.cat([t, e], dim=1) > pos - window
    keys, values = torch.cat([k, exact_k]).to(q.dtype), torch.cat([v, exact_v]).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                         values.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def decode_attention(q: torch.Tensor, kv: LayerKVCache, meta: AttentionMetadata, scale: float,
                     window: int = 0) -> torch.Tensor:
    """The short queries of ``meta`` (the first ``num_decode_tokens`` rows of ``q``)."""
    tables, lens, starts = meta.decode_block_tables, meta.decode_context_lens, meta.decode_query_start
    if not q.is_cuda and (ext := load_cpu_extension()) and q.dtype in (torch.float32, torch.bfloat16):
        return ext.kivi_paged_attention(q, kv.k, kv.v, kv.k_params, kv.v_params, kv.staging, tables, starts,
                                        lens, meta.decode_stage_slots, scale, residual_blocks(kv.k.shape[1]), window)
    return decode_attention_reference(q, kv, meta, scale, window)


def decode_attention_reference(q: torch.Tensor, kv: LayerKVCache, meta: AttentionMetadata, scale: float,
                               window: int = 0) -> torch.Tensor:
    """:func:`decode_attention` in PyTorch, one sequence at a time."""
    bs = kv.k.shape[1]
    lens = meta.decode_context_lens.tolist()
    starts = meta.decode_query_start.tolist() if meta.decode_query_start is not None else list(range(len(lens) + 1))
    stage = meta.decode_stage_slots.tolist()
    out = torch.empty_like(q)
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        ctx = lens[s]
        k, v = quantized_context(kv, meta.decode_block_tables[s], ctx)
        out[a:b] = attend(q[a:b], k, v, exact_context(kv, stage[s], ctx - (b - a), ctx), bs, scale, window)
    return out


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKVCache, meta: AttentionMetadata,
            scale: float, window: int = 0) -> torch.Tensor:
    """:meth:`infera.layers.attention.Attention.forward` over a 2-bit cache: [T, Hq * D]."""
    store_kv(kv, k, v, meta.slot_mapping, meta.stage_mapping)
    bs, d = kv.k.shape[1], meta.num_decode_tokens
    out = torch.empty_like(q)
    if d:
        out[:d] = decode_attention(q[:d], kv, meta, scale, window)
    for chunk in meta.prefills:
        s, n, ctx = chunk.query_start, chunk.query_len, chunk.context_len
        cached_k, cached_v = quantized_context(kv, chunk.block_table, ctx)
        exact = exact_context(kv, chunk.stage_slots, ctx - n, ctx, (k[s:s + n], v[s:s + n]))
        out[s:s + n] = attend(q[s:s + n], cached_k, cached_v, exact, bs, scale, window)
        if chunk.observe:  # (ranked over the quantized keys, the chunk's own exact)
            seen = torch.cat([cached_k[:ctx - n], exact[1][-n:]])
            paid = paged_attention.window_attention(q[s + n - chunk.observe:s + n], seen, scale)
            torch.maximum(chunk.scores, paid, out=chunk.scores)
    return out.flatten(1)
