"""Attention kernels against a dense reference on random paged layouts."""
from __future__ import annotations

import pytest
import torch

from infera.kernels import load_cpu_extension
from infera.layers import paged_attention as pa


def dense_attention(q, k, v, scale):
    """Plain softmax(q k^T) v with GQA, in float64: q [Tq, Hq, D], k/v [Tk, Hkv, D], causal at the end."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged_layout(lens, num_blocks=64, block_size=4, hkv=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    width = max(-(-n // block_size) for n in lens)
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:len(lens) * width].view(len(lens), width)
    return k_cache, v_cache, tables


def contiguous_kv(cache, table, n):
    return cache[table].flatten(0, 1)[:n]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", ["reference", "native"])
def test_decode_attention(dtype, tol, impl):
    lens = [1, 5, 16, 23]
    hq, hkv, d = 6, 2, 16
    k_cache, v_cache, tables = paged_layout(lens, hkv=hkv, d=d, dtype=dtype)
    q = torch.randn(len(lens), hq, d).to(dtype)
    ctx = torch.tensor(lens)
    if impl == "native":
        ext = load_cpu_extension("paged_attention")
        if ext is None:
            pytest.skip("no C++ compiler for native kernels")
        out = ext.decode_attention(q, k_cache, v_cache, tables, ctx, 0.25)
    else:
        out = pa.decode_attention_reference(q, k_cache, v_cache, tables, ctx, 0.25)
    for i, n in enumerate(lens):
        ref = dense_attention(q[i:i + 1], contiguous_kv(k_cache, tables[i], n), contiguous_kv(v_cache, tables[i], n), 0.25)
        assert (out[i].double() - ref[0]).abs().max() < tol


@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 12), (1, 9)])
def test_prefill_attention_with_cached_prefix(tq, tk):
    q, k, v = torch.randn(tq, 4, 8), torch.randn(tk, 2, 8), torch.randn(tk, 2, 8)
    out = pa.prefill_attention(q, k, v, 0.3)
    assert (out.double() - dense_attention(q, k, v, 0.3)).abs().max() < 1e-5


def test_store_and_gather_roundtrip():
    k_cache, v_cache = torch.zeros(8, 4, 2, 3), torch.zeros(8, 4, 2, 3)
    k, v = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    table = torch.tensor([5, 2])
    slots = torch.tensor([5 * 4 + i for i in range(4)] + [2 * 4, 2 * 4 + 1])
    pa.store_kv(k, v, k_cache, v_cache, slots)
    gk, gv = pa.gather_kv(k_cache, v_cache, table, 6)
    assert torch.equal(gk, k) and torch.equal(gv, v)
