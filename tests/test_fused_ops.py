"""Fused CPU kernels against the unfused PyTorch ops they replace (HF transformers' op order)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from infera.kernels import load_cpu_extension, supported_levels

# Every test runs at each ISA level this CPU supports (the `ext` and `isa` fixtures of conftest.py).
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for native kernels")


@pytest.mark.parametrize("level", supported_levels())
def test_extension_builds(level):
    assert load_cpu_extension(level) is not None, f"the native kernels failed to build at ISA level {level} (see the log)"


TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def rms_ref(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_fused_add(ext, dtype):
    x, r, w = torch.randn(37, 96).to(dtype), torch.randn(37, 96).to(dtype), torch.rand(96).to(dtype) + 0.5
    assert torch.allclose(ext.rms_norm(x, w, 1e-5).float(), rms_ref(x, w, 1e-5).float(), atol=TOL[dtype], rtol=TOL[dtype])
    x2, r2 = x.clone(), r.clone()
    ext.fused_add_rms_norm(x2, r2, w, 1e-5)
    assert torch.equal(r2, x + r)
    assert torch.allclose(x2.float(), rms_ref(x + r, w, 1e-5).float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_on_strided_views(ext, dtype):
    hq, hkv, d, t = 4, 2, 16, 9
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    freqs = torch.outer(torch.arange(64, dtype=torch.float), 1.0 / (10000 ** (torch.arange(0, d, 2) / d)))
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.randint(0, 64, (t,))

    def ref(x):
        c, s = cos[pos].unsqueeze(1).to(dtype), sin[pos].unsqueeze(1).to(dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    want_q, want_k, v_before = ref(q), ref(k), v.clone()
    ext.rotary(q, k, cos, sin, pos)
    assert torch.allclose(q.float(), want_q.float(), atol=TOL[dtype]) and torch.allclose(k.float(), want_k.float(), atol=TOL[dtype])
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(ext, dtype):
    x = torch.randn(11, 2 * 40).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    assert torch.allclose(ext.silu_and_mul(x).float(), (F.silu(gate) * up).float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5, 16, 49155])
def test_top_tokens_match_argmax_and_softmax(isa, dtype, vocab, monkeypatch):
    """The native top token is torch.argmax's (the first of tied maxima, a row that is -inf up to its
    end), its probability the softmax's to 1e-5; a row with nothing above -inf gives token 0 and
    probability 0.  The PyTorch fallback (no native kernels) agrees."""
    from infera.layers import sampler

    torch.manual_seed(0)
    logits = (4 * torch.randn(6, vocab)).to(dtype)
    logits[1] = logits[1].clamp(max=0.5)  # many tied maxima
    logits[2, : vocab // 2] = float("-inf")
    logits[3] = float("-inf")
    ids, probs = sampler.top_tokens(logits, with_probs=True)
    ref_probs, _ = logits.float().softmax(-1).max(-1)
    assert torch.equal(ids, logits.argmax(-1)) and ids[3] == 0
    finite = [0, 1, 2, 4, 5]
    assert torch.allclose(probs[finite], ref_probs[finite], rtol=1e-5, atol=1e-8) and probs[3] == 0
    assert torch.equal(sampler.top_tokens(logits)[0], ids) and sampler.top_tokens(logits)[1] is None
    monkeypatch.setattr(sampler, "cpu_kernels", lambda x: None)
    fallback_ids, fallback_probs = sampler.top_tokens(logits, with_probs=True)
    assert torch.equal(fallback_ids, ids) and torch.allclose(fallback_probs[finite], probs[finite], rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float_linear_bf16_rows_match_float32_products(ext, rows, with_bias):
    """Decode rows: fp32 accumulation, one bf16 rounding of the result (bias added before it);
    each row's values do not depend on the other rows (the same alone as in a batch)."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 96).bfloat16(), (torch.randn(70, 96) * 0.1).bfloat16()  # 70 = 17 x 4 + 2 rows
    bias = torch.randn(70).bfloat16() if with_bias else None
    out = ext.float_linear(x, w, bias)
    ref = x.float() @ w.float().t() + (bias.float() if with_bias else 0)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 70)
    assert torch.allclose(out.float(), ref, rtol=2 ** -8, atol=1e-5)
    if rows <= 8:  # the native kernel's range (BF16_GEMV_MAX_ROWS)
        assert torch.equal(out[-1:], ext.float_linear(x[-1:].contiguous(), w, bias))


def test_float_linear_takes_torch_where_the_kernel_does_not_apply(ext):
    x, w = torch.randn(2, 40), torch.randn(6, 40)  # float32; K not a multiple of 32 either
    assert torch.equal(ext.float_linear(x, w), F.linear(x, w))
    assert torch.equal(ext.float_linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
