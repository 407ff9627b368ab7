"""Attention kernels against a dense reference on random paged layouts."""
from __future__ import annotations

import pytest
import torch

from infera.layers import paged_attention as pa
from infera.layers.attention import LayerKVCache


def dense_attention(q, k, v, scale, window=0):
    """Plain softmax(q k^T) v with GQA, in float64: q [Tq, Hq, D], k/v [Tk, Hkv, D], causal at the end
    (with ``window``: each query over its last ``window`` positions)."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    tq, tk = q.shape[0], k.shape[0]
    query = torch.arange(tk - tq, tk)[:, None]
    mask = (torch.arange(tk) <= query) & ((torch.arange(tk) > query - window) if window else True)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged_layout(lens, num_blocks=128, block_size=4, hkv=2, d=16, dtype=torch.float32, cache=None, seed=0):
    """A random cache of ``dtype`` values (stored as ``cache``: int8 or a 16-bit float, written through
    store_kv; None: as they are) and block tables for ``lens``."""
    g = torch.Generator().manual_seed(seed)
    if cache is not None:
        int8 = cache == torch.int8
        kv = LayerKVCache(*(torch.zeros(num_blocks, block_size, hkv, d, dtype=cache) for _ in range(2)),
                          *((torch.ones(num_blocks, block_size, hkv) for _ in range(2)) if int8 else ()))
        k, v = (torch.randn(num_blocks * block_size, hkv, d, generator=g).to(dtype) for _ in range(2))
        pa.store_kv(kv, k, v, torch.arange(num_blocks * block_size))
    else:
        kv = LayerKVCache(*(torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype) for _ in range(2)))
    width = max(-(-n // block_size) for n in lens)
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:len(lens) * width].view(len(lens), width)
    return kv, tables


SHORT_QUERY_CASES = [  # query dtype, cache (None: the query's dtype), tolerance
    (torch.float32, None, 1e-5), (torch.bfloat16, None, 2e-2), (torch.float32, torch.int8, 1e-5),
    (torch.bfloat16, torch.int8, 2e-2), (torch.float32, torch.float16, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
    (torch.bfloat16, torch.float16, 2e-2)]


def short_query_case(dtype, cache, queries, d):
    """Contexts that span several 16-token tiles and end inside one, and several 128-token chunks
    (merged); one query row per sequence, or several: (q, kv, tables, starts, context lengths)."""
    lens = [1, 5, 16, 23, 50, 300]
    nq = [1] * 6 if queries == "one token each" else [1, 3, 16, 4, 9, 7]
    hq, hkv = 6, 2
    kv, tables = paged_layout(lens, num_blocks=512, hkv=hkv, d=d, dtype=dtype, cache=cache)
    starts = torch.tensor([0, *torch.tensor(nq).cumsum(0).tolist()])
    q = torch.randn(int(starts[-1]), hq, d).to(dtype)
    return q, kv, tables, starts, torch.tensor(lens)


def check_against_dense(out, q, kv, tables, starts, ctx, tol, window=0, scale=0.25):
    for i, n in enumerate(ctx.tolist()):
        k, v = pa.gather_kv(kv, tables[i], n, torch.float32)
        a, b = int(starts[i]), int(starts[i + 1])
        ref = dense_attention(q[a:b], k, v, scale, window)
        assert (out[a:b].double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype,cache,tol", SHORT_QUERY_CASES)
@pytest.mark.parametrize("queries", ["one token each", "varlen"])
@pytest.mark.parametrize("d", [16, 64, 24])
def test_short_query_attention(dtype, cache, tol, queries, d):
    """The PyTorch reference against dense causal attention over the cache's (dequantized) contents."""
    q, kv, tables, starts, ctx = short_query_case(dtype, cache, queries, d)
    out = pa.decode_attention_reference(q, kv, tables, ctx, 0.25, None if queries == "one token each" else starts)
    check_against_dense(out, q, kv, tables, starts, ctx, tol)


@pytest.mark.parametrize("dtype,cache,tol", SHORT_QUERY_CASES)
@pytest.mark.parametrize("queries", ["one token each", "varlen"])
@pytest.mark.parametrize("d", [16, 64, 24])  # the vector paths take 16 * {1, 2, 4, 8}; 24 the scalar one
def test_native_short_query_attention(ext, dtype, cache, tol, queries, d):
    """The native kernel of each ISA level against dense causal attention, to the same tolerances
    at every level. AVX2 tiles 8 positions where AVX-512 tiles 16, sums 8 lanes wide, and widens
    bf16 K rows where AVX512-BF16 takes pair dot products: the two levels' rows differ by rounding
    only (measured: at most 2e-6 in float32, one bfloat16 step in bfloat16), each level bitwise
    deterministic (test_native_rows_do_not_depend_on_the_batch). A 16-bit cache under float32
    queries is widened as it is read."""
    q, kv, tables, starts, ctx = short_query_case(dtype, cache, queries, d)
    out = ext.paged_attention(q, kv.k, kv.v, kv.k_scale, kv.v_scale, tables, starts, ctx, 0.25)
    check_against_dense(out, q, kv, tables, starts, ctx, tol)


@pytest.mark.parametrize("dtype,cache,tol", [SHORT_QUERY_CASES[i] for i in (0, 1, 2, 4)])
@pytest.mark.parametrize("queries", ["one token each", "varlen"])
@pytest.mark.parametrize("window", [1, 40, 200])
@pytest.mark.parametrize("d", [64, 256, 24])  # the vector paths (Gemma's 256 too), the scalar one
def test_sliding_window_attention(ext, dtype, cache, tol, queries, window, d):
    """A sliding-window layer's queries (each over its last ``window`` positions: windows inside one
    block, across blocks and 128-position chunks, longer than some contexts), natively at each ISA
    level and in PyTorch, against dense windowed attention."""
    q, kv, tables, starts, ctx = short_query_case(dtype, cache, queries, d)
    starts_arg, scale = None if queries == "one token each" else starts, d ** -0.5  # (scores of unit spread)
    out = ext.paged_attention(q, kv.k, kv.v, kv.k_scale, kv.v_scale, tables, starts_arg, ctx, scale, window)
    check_against_dense(out, q, kv, tables, starts, ctx, tol, window, scale)
    ref = pa.decode_attention_reference(q, kv, tables, ctx, scale, starts_arg, window)
    check_against_dense(ref, q, kv, tables, starts, ctx, tol, window, scale)


@pytest.mark.parametrize("dtype,cache", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.int8),
                                         (torch.float32, torch.int8), (torch.float32, torch.float16)])
@pytest.mark.parametrize("window", [0, 150])
def test_native_rows_do_not_depend_on_the_batch(ext, dtype, cache, window):
    """A query row's output is bitwise the same alone (a decode step), in a batch of other
    sequences, and as one row of a multi-token verification query at the same position, at every
    ISA level (in a sliding-window layer too): what keeps speculative decoding and batching exactly
    lossless under greedy decoding."""
    lens, hq, hkv, d = [290, 7, 140], 6, 2, 64
    kv, tables = paged_layout(lens, num_blocks=512, hkv=hkv, d=d, dtype=dtype, cache=cache)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, hq, d, generator=g).to(dtype)  # 5 queries of sequence 0: positions 285..289
    ctx = torch.tensor(lens)

    def attend(rows, seqs, starts, lengths):
        return ext.paged_attention(rows, kv.k, kv.v, kv.k_scale, kv.v_scale, tables[seqs], starts, lengths, 0.125,
                                   window)

    verify = attend(q, [0], torch.tensor([0, 5]), ctx[:1])
    batch = torch.cat([q[4:5], torch.randn(2, hq, d, generator=g).to(dtype)])
    for i in range(5):  # row i alone: a decode step at position 285 + i
        alone = attend(q[i:i + 1], [0], None, torch.tensor([286 + i]))
        assert torch.equal(alone[0], verify[i])
    assert torch.equal(attend(batch, [0, 1, 2], None, ctx)[0], verify[4])
    assert torch.equal(attend(batch, [0, 1, 2], None, ctx), attend(batch, [0, 1, 2], None, ctx))  # deterministic


@pytest.mark.parametrize("tq,tk,window", [(12, 12, 5), (5, 12, 3), (1, 9, 4), (6, 6, 10)])
def test_windowed_prefill_attention(tq, tk, window):
    q, k, v = torch.randn(tq, 4, 8), torch.randn(tk, 2, 8), torch.randn(tk, 2, 8)
    out = pa.prefill_attention(q, k, v, 0.3, window)
    assert (out.double() - dense_attention(q, k, v, 0.3, window)).abs().max() < 1e-5


def test_int8_roundtrip_error():
    x = torch.randn(100, 4, 64) * torch.linspace(0.1, 10, 100)[:, None, None]
    q, s = pa.quantize_int8(x)
    err = (pa.dequantize_int8(q, s, torch.float32) - x).abs()
    assert torch.all(err <= s.unsqueeze(-1) / 2 + 1e-6)  # at most half a step per element


@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 12), (1, 9)])
def test_prefill_attention_with_cached_prefix(tq, tk):
    q, k, v = torch.randn(tq, 4, 8), torch.randn(tk, 2, 8), torch.randn(tk, 2, 8)
    out = pa.prefill_attention(q, k, v, 0.3)
    assert (out.double() - dense_attention(q, k, v, 0.3)).abs().max() < 1e-5


def test_store_and_gather_roundtrip():
    kv = LayerKVCache(torch.zeros(8, 4, 2, 3), torch.zeros(8, 4, 2, 3))
    k, v = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    table = torch.tensor([5, 2])
    slots = torch.tensor([5 * 4 + i for i in range(4)] + [2 * 4, 2 * 4 + 1])
    pa.store_kv(kv, k, v, slots)
    gk, gv = pa.gather_kv(kv, table, 6, torch.float32)
    assert torch.equal(gk, k) and torch.equal(gv, v) and pa.as_cached(kv, k, v)[0] is k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [None, torch.int8, torch.float16])
@pytest.mark.parametrize("d", [4, 72])  # 72: vectors (of 8 or 16) and a scalar tail at AVX-512
def test_native_store_kv_matches_pytorch(ext, dtype, cache, d):
    """The native writer of each ISA level against index_copy_ (for an int8 cache, of quantize_int8's
    quants and scales to the bit; for a 16-bit one, of the rows rounded by Tensor.to), on strided
    K/V (views into a fused QKV output) with a skipped slot (-1); and what the cache's readers see
    equals as_cached."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(5, 3 * 2 * d, generator=g) * 50).to(dtype)
    qkv[1, 2 * d:3 * d] = 0  # an all-zero head row: the scale's floor
    k, v = qkv[:, 2 * d:4 * d].view(5, 2, d), qkv[:, 4 * d:].view(5, 2, d)  # token rows 6 d apart
    slots = torch.tensor([9, 0, -1, 31, 4])
    int8_cache = cache == torch.int8
    cache_dtype = cache or dtype
    kv = LayerKVCache(*(torch.zeros(8, 4, 2, d, dtype=cache_dtype) for _ in range(2)),
                      *((torch.zeros(8, 4, 2), torch.zeros(8, 4, 2)) if int8_cache else (None, None)))
    ext.store_kv(kv.k, kv.v, k, v, slots, kv.k_scale, kv.v_scale)
    keep = slots >= 0
    for cache, scales, x in ((kv.k, kv.k_scale, k), (kv.v, kv.v_scale, v)):
        rows, row_scales = pa.quantize_int8(x[keep]) if int8_cache else (x[keep].to(cache_dtype), None)
        expect = torch.zeros_like(cache).view(-1, 2, d).index_copy_(0, slots[keep], rows)
        assert torch.equal(cache.view_as(expect), expect)
        if int8_cache:
            expect = torch.zeros_like(scales).view(-1, 2).index_copy_(0, slots[keep], row_scales)
            assert torch.equal(scales.view_as(expect), expect)
    table = torch.arange(8)
    seen_k, _ = pa.gather_kv(kv, table, 32, dtype)
    assert torch.equal(seen_k[slots[keep]], pa.as_cached(kv, k[keep], v[keep])[0])
    with pytest.raises(RuntimeError, match="out of the cache"):
        ext.store_kv(kv.k, kv.v, k, v, torch.tensor([0, 1, 2, 3, 32]), kv.k_scale, kv.v_scale)
