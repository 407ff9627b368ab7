"""Triton kernels of the CUDA attention backend; :mod:`infera.layers.paged_attention` dispatches
here for CUDA tensors.

- :func:`store_kv` scatters each token's K/V row into its cache slot; slot -1 skips the row (the
  padded rows of a CUDA-graph batch).
- :func:`decode_attention`: one query token per sequence over its paged context. One program
  serves all query heads of a KV head (GQA); the context is cut into ``num_splits`` parts attended
  in parallel (flash-decoding), and a second kernel merges the parts by their log-sum-exp.
- :func:`prefill_attention`: causal attention of varlen query chunks (a flat batch delimited by
  ``cu_seqlens_q``) over keys and values read from the paged cache, cached prefix included;
  flash-attention style online softmax over key tiles. :func:`chunk_attention` runs it on one
  chunk whose K/V are contiguous tensors (a cache of one block).

Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the model's dtype, or int8 with
one float32 scale per token and head, dequantized on load and rounded to the query's dtype as the
PyTorch reference does. Scores, softmax and accumulators are float32; probabilities are rounded to
the value dtype before the weighted sum, as flash attention does.

CPU tensors run through Triton's interpreter (``TRITON_INTERPRET=1``, for the tests). Its ``tl.dot``
multiplies bfloat16 operands as raw integers and it rounds float32 to bfloat16 by truncation, so
there (``UPCAST``) dot operands are cast to float32 (exact) and intermediates stay float32.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from infera.layers.attention import LayerKVCache

MAX_SPLITS = 32


def decode_config(dtype: torch.dtype) -> tuple[int, int]:
    """(keys per tile, warps) of the decode kernel, and
    :func:`prefill_config`: (queries per program, keys per tile, warps) of the prefill kernel.

    Chosen so that no variant spills registers on sm_90 (ptxas, see tests/test_triton_kernels.py);
    float32 dots run on CUDA cores and need smaller tiles. Not yet tuned by measurement on a GPU."""
    return (32, 8) if dtype == torch.float32 else (64, 4)


def prefill_config(dtype: torch.dtype) -> tuple[int, int, int]:
    return (32, 32, 8) if dtype == torch.float32 else (64, 64, 8)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _round(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` (float32) rounded to ``DTYPE``; kept as is under the interpreter, which truncates."""
    if UPCAST:
        return x
    return x.to(DTYPE)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    cols = tl.arange(0, BLOCK)
    mask = cols < tl.where(slot >= 0, WIDTH, 0)
    k = tl.load(k_ptr + token * stride_k + cols, mask=mask)
    v = tl.load(v_ptr + token * stride_v + cols, mask=mask)
    tl.store(k_cache_ptr + slot * WIDTH + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * WIDTH + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv_tile(cache_ptr, scale_ptr, block, offset, kv_head, d, mask, d_mask, stride_cb, stride_ct, stride_ch,
                  stride_sb, stride_st, DTYPE: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``(block, offset)`` of one KV head: [BLOCK_N, BLOCK_D] in ``DTYPE``."""
    rows = block * stride_cb + offset * stride_ct + kv_head * stride_ch
    x = tl.load(cache_ptr + rows[:, None] + d[None, :], mask=mask[:, None] & d_mask[None, :], other=0.0)
    if QUANT:
        s = tl.load(scale_ptr + block * stride_sb + offset * stride_st + kv_head, mask=mask, other=0.0)
        x = _round(x.to(tl.float32) * s[:, None], DTYPE, UPCAST)
    return x


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr,
                   o_part_ptr, lse_ptr, scale, block_size, num_heads, window,
                   stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_sb, stride_st, stride_bt,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Program (sequence, KV head, split): the split's part of the context (of its last ``window``
    positions, if > 0) for the head's group."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    split_len = tl.cdiv(tl.cdiv(ctx - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, ctx)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + h
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    dtype = q_ptr.dtype.element_ty

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        mask = pos < end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // block_size, mask=mask, other=0)
        offset = pos % block_size
        k = _load_kv_tile(k_cache_ptr, k_scale_ptr, block, offset, kv_head, d, mask, d_mask, stride_kb, stride_kt,
                          stride_kh, stride_sb, stride_st, dtype, QUANT, UPCAST)
        v = _load_kv_tile(v_cache_ptr, v_scale_ptr, block, offset, kv_head, d, mask, d_mask, stride_vb, stride_vt,
                          stride_vh, stride_sb, stride_st, dtype, QUANT, UPCAST)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale
        s = tl.where(mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_round(p, dtype, UPCAST), v, UPCAST, PRECISION)
        m_i = m_new

    # an empty split (short context) has l_i == 0: log-sum-exp -inf, no weight in the merge
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    out = acc / l_safe[:, None]
    part = (seq * num_heads + heads) * NUM_SPLITS + split
    tl.store(o_part_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + part, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(o_part_ptr, lse_ptr, out_ptr, num_heads, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """Program (sequence, query head): the splits' outputs weighted by exp(lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    part = (seq * num_heads + head) * NUM_SPLITS + s
    lse = tl.load(lse_ptr + part, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))  # all empty (context 0): all weights 0
    o = tl.load(o_part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & (d < HEAD_DIM)[None, :],
                other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, cu_seqlens_q_ptr,
                    context_lens_ptr, out_ptr, scale, block_size,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                    stride_vh, stride_sb, stride_st, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query tile, sequence, query head): ``BLOCK_M`` queries of a chunk whose last query
    is context position ``context_len - 1``, causal over the cached context."""
    tile_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_mask = rows < q_len
    d_mask = d < HEAD_DIM
    q_pos = ctx - q_len + rows
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    dtype = q_ptr.dtype.element_ty

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(ctx, ctx - q_len + (tile_m + 1) * BLOCK_M)  # up to the tile's last query
    for tile in range(0, kv_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        mask = pos < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // block_size, mask=mask, other=0)
        offset = pos % block_size
        k = _load_kv_tile(k_cache_ptr, k_scale_ptr, block, offset, kv_head, d, mask, d_mask, stride_kb, stride_kt,
                          stride_kh, stride_sb, stride_st, dtype, QUANT, UPCAST)
        v = _load_kv_tile(v_cache_ptr, v_scale_ptr, block, offset, kv_head, d, mask, d_mask, stride_vb, stride_vt,
                          stride_vh, stride_sb, stride_st, dtype, QUANT, UPCAST)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale
        # every query sees key 0, so each row's maximum is finite from the first tile on
        s = tl.where(mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_round(p, dtype, UPCAST), v, UPCAST, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


# ---- launchers ------------------------------------------------------------------------------

def _dot_options(q: torch.Tensor) -> dict:
    """CPU tensors run in the interpreter (see the module docstring); float32 needs IEEE dots
    (Triton's default would round the operands to TF32)."""
    return dict(UPCAST=not q.is_cuda, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [tokens, width] with each token's row contiguous (a view where it already is)."""
    x = x.flatten(1)
    return x if x.stride(1) == 1 else x.contiguous()


def _cache_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None) -> tuple:
    """(block, token, head) strides of K and V, and (block, token) strides of the scales (0 when not int8)."""
    if k_scale is None and k_cache.dtype != q.dtype:
        raise ValueError(f"a {k_cache.dtype} KV cache cannot serve {q.dtype} queries")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or (k_scale is not None and k_scale.stride(-1) != 1):
        raise ValueError("the KV cache's head dimension must be contiguous")
    scale_strides = (k_scale.stride(0), k_scale.stride(1)) if k_scale is not None else (0, 0)
    return (*k_cache.stride()[:3], *v_cache.stride()[:3], *scale_strides)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_decode_splits(num_programs: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head) so that about two waves of programs fill the GPU.

    It depends on the batch shape only, never on context lengths, so a CUDA graph captured for a
    batch size stays valid for any contexts. (1 on CPU, where the interpreter runs.)"""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * sms, num_programs)))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Row ``i`` of ``k``/``v`` ([T, ...]) goes to flat slot ``slot_mapping[i]`` of the caches
    ([num_blocks, block_size, ...], contiguous); slot -1 skips the row."""
    k, v = _rows(k), _rows(v)
    width = k.shape[1]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache[0, 0].numel() != width:
        raise ValueError(f"caches of shape {tuple(k_cache.shape)} do not take rows of {width} values")
    if k.shape[0]:
        _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                        WIDTH=width, BLOCK=triton.next_power_of_2(width))


def decode_attention(q: torch.Tensor, kv: LayerKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, num_splits: int | None = None, block_n: int | None = None,
                     window: int = 0) -> torch.Tensor:
    """One query token per sequence over its paged context (its last ``window`` positions if > 0):
    q [B, Hq, D] -> [B, Hq, D].

    ``context_lens`` may hold 0 (a padded row): its output is zeros."""
    batch, num_heads, head_dim = q.shape
    default_block_n, num_warps = decode_config(q.dtype)
    num_kv_heads = kv.k.shape[2]
    group = num_heads // num_kv_heads
    splits = num_splits or num_decode_splits(batch * num_kv_heads, q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    o_part = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    k_scale, v_scale = (kv.k_scale, kv.v_scale) if kv.quantized else (kv.k, kv.v)
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, kv.k, kv.v, k_scale, v_scale, block_tables, context_lens, o_part, lse, scale, kv.k.shape[1], num_heads,
        window, q.stride(0), q.stride(1), *_cache_args(q, kv.k, kv.v, kv.k_scale), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n or default_block_n, BLOCK_D=block_d, NUM_SPLITS=splits, QUANT=kv.quantized,
        **_dot_options(q), num_warps=num_warps)
    _decode_merge_kernel[(batch, num_heads)](
        o_part, lse, out, num_heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits))
    return out


def prefill_attention(q: torch.Tensor, kv: LayerKVCache, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                      block_tables: torch.Tensor, max_query_len: int, scale: float,
                      block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Causal attention of the chunks of a flat batch over their paged contexts: q [T, Hq, D] -> [T, Hq, D].

    Chunk ``i`` is queries ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``, the last positions of a context
    of ``context_lens[i]`` tokens whose K/V (the chunk's own included) are in the cache at
    ``block_tables[i]``."""
    return _prefill(q, kv.k, kv.v, kv.k_scale, kv.v_scale, cu_seqlens_q, context_lens, block_tables, max_query_len,
                    scale, block_m, block_n)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over ``len(k)`` contiguous K/V rows:
    :func:`prefill_attention` over a cache of one block holding them."""
    n, ctx = q.shape[0], k.shape[0]
    info = torch.tensor([0, n, ctx, 0], dtype=torch.int32, pin_memory=q.is_cuda).to(q.device, non_blocking=True)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    return _prefill(q, k.unsqueeze(0), v.unsqueeze(0), None, None, info[0:2], info[2:3], info[3:4].view(1, 1), n,
                    scale)


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
             v_scale: torch.Tensor | None, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
             block_tables: torch.Tensor, max_query_len: int, scale: float, block_m: int | None = None,
             block_n: int | None = None) -> torch.Tensor:
    num_heads, head_dim = q.shape[1:]
    default_m, default_n, num_warps = prefill_config(q.dtype)
    block_m, block_n = block_m or default_m, block_n or default_n
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = context_lens.shape[0]
    if not num_seqs or not max_query_len:
        return out
    quantized = k_scale is not None
    _prefill_kernel[(triton.cdiv(max_query_len, block_m), num_seqs, num_heads)](
        q, k_cache, v_cache, k_scale if quantized else k_cache, v_scale if quantized else v_cache, block_tables,
        cu_seqlens_q, context_lens, out, scale, k_cache.shape[1], q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), *_cache_args(q, k_cache, v_cache, k_scale), block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), QUANT=quantized, **_dot_options(q), num_warps=num_warps)
    return out
