"""Quantizers and the native block kernels.

Kernel tolerances: against the same math as the kernel's path, max |diff| <= 1e-4 * max |y|
(float32 output) or 1e-2 * max |y| (bfloat16 output rounding). The int8 path quantizes the
activations per block of 32 (round-half-even); the AMX path (batches of AMX_MIN_ROWS rows or more,
where the CPU has AMX) multiplies bf16 activations by the weights dequantized to bf16. Against the
dequantized float weights with float activations, max |diff| <= 2.5% of max |y| (the int8
activation rounding: measured 0.2-1.6%).
Reconstruction bounds (relative Frobenius error, 192 x 576 matrices) are in ERROR_BOUNDS.
"""
from __future__ import annotations

import pytest
import torch

from infera.kernels import supported_levels
from infera.quant import QUANTIZERS, quantization_config
from infera.quant.gguf_blocks import GGUFBlockQuantizer, GGUFTensor
from infera.quant.layout import kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="native kernels could not be compiled")

METHODS = [*QUANTIZERS, "q8_0", "q4_0", "q4_1"]


def quantizer(method: str):
    return GGUFBlockQuantizer(method) if method in ("q8_0", "q4_0", "q4_1") else quantization_config(method).quantizer


def matrices(n: int = 192, k: int = 576) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    channels = w.clone()
    channels[:, torch.randperm(k, generator=g)[:6]] *= 25  # outliers in a few input channels
    scattered = w.clone()
    scattered.view(-1)[torch.randint(0, n * k, (n * k // 250,), generator=g)] *= 30  # scattered outlier weights
    return {"random": w, "input-channel outliers": channels, "scattered outliers": scattered}


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


# relative Frobenius error bounds: (random, input-channel outliers, scattered outliers); measured + margin
ERROR_BOUNDS = {
    "int8": (0.01, 0.05, 0.05), "llm_int8": (0.01, 0.05, 0.05), "q8_0": (0.007, 0.015, 0.015),
    "int4": (0.1, 0.18, 0.18), "q4_0": (0.1, 0.15, 0.14), "q4_1": (0.09, 0.13, 0.13),
    "int4_ic": (0.1, 0.1, 0.18), "dense_sparse": (0.095, 0.07, 0.055), "trit_planes": (0.19, 0.16, 0.15),
}


@pytest.mark.parametrize("method", METHODS)
def test_reconstruction_error(method):
    q = quantizer(method)
    for (name, w), bound in zip(matrices().items(), ERROR_BOUNDS[method]):
        err = rel_error(q.dequantize(q.quantize(w)), w)
        assert err < bound, f"{method} on {name}: error {err:.4f} >= {bound}"


def test_per_ic_beats_per_oc_when_outliers_sit_in_input_channels():
    w = matrices()["input-channel outliers"]
    oc, ic = quantizer("int4"), quantizer("int4_ic")
    err_oc, err_ic = rel_error(oc.dequantize(oc.quantize(w)), w), rel_error(ic.dequantize(ic.quantize(w)), w)
    assert err_ic < 0.7 * err_oc, (err_ic, err_oc)


def test_dense_and_sparse_keeps_outliers_exact_and_beats_int4():
    w = matrices()["scattered outliers"]
    ds, int4 = quantizer("dense_sparse"), quantizer("int4")
    t = ds.quantize(w)
    approx = ds.dequantize(t)
    rows = torch.repeat_interleave(torch.arange(w.shape[0]), t["sparse_indptr"].diff().long())
    cols = t["sparse_indices"].long()
    assert len(cols) == int(w.numel() * 0.005)
    assert torch.allclose(approx[rows, cols], w[rows, cols], rtol=0, atol=1e-5)
    assert rel_error(approx, w) < 0.4 * rel_error(int4.dequantize(int4.quantize(w)), w)


def test_trit_planes_refinement_lowers_the_error():
    from infera.quant.trit_planes import TritPlaneQuantizer

    w = matrices()["random"]
    errors = [rel_error(q.dequantize(q.quantize(w)), w) for q in (TritPlaneQuantizer(iterations=1),
                                                                TritPlaneQuantizer(iterations=6))]
    assert errors[1] < errors[0]
    codes = quantizer("trit_planes").quantize(w)["qweight"]
    assert int((codes & 3).max()) <= 2 and int((codes >> 6).max()) <= 2  # trits + 1 in 0..2


def quantize_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x with each block of ``block`` inputs rounded to int8 as the kernel does (scale max|x| / 127):
    32, or a scale group's inputs for layouts with sub-scales (``BlockLayout.activation_block``)."""
    b = x.float().reshape(x.shape[0], -1, block)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127).div(amax), torch.zeros_like(amax))  # not 127 / t:
    q = torch.round(b * inv)  # that is reciprocal(t) * 127, rounded differently from the kernel's division
    return (q * (amax / 127)).reshape(x.shape)


def takes_amx(method: str, rows: int) -> bool:
    """Whether the kernel multiplies ``rows`` activation rows with AMX tiles (see csrc/ops.h)."""
    ext = kernels()
    return rows >= ext.AMX_MIN_ROWS and ext.amx_available() and method not in ("int4_ic", "dense_sparse")


def kernel_reference(method: str, t: dict, x: torch.Tensor, q) -> torch.Tensor:
    """The product the kernel computes, in float32 torch ops."""
    if takes_amx(method, x.shape[0]):
        return x.bfloat16().float() @ q.dequantize(t).bfloat16().float().T
    x = x.float()
    if method == "int4_ic":
        n, g = t["qweight"].shape[0], t["qweight"].shape[0] // t["scales"].shape[0]
        codes = q.dequantize(dict(t, scales=torch.ones_like(t["scales"]), mins=torch.zeros_like(t["mins"])))
        parts = [quantize_activations(x * t["scales"][i].float()) @ codes[i * g:(i + 1) * g].T
                 + (x @ t["mins"][i].float())[:, None] for i in range(n // g)]
        return torch.cat(parts, dim=1)
    if method == "dense_sparse":
        dense = q.dense.dequantize(t)
        return quantize_activations(x) @ dense.T + x @ (q.dequantize(t) - dense).T
    w = q.dequantize(t)
    if method == "llm_int8":
        outliers = x.abs() > q.threshold
        return quantize_activations(torch.where(outliers, 0, x)) @ w.T + torch.where(outliers, x, 0) @ w.T
    return quantize_activations(x) @ w.T


@pytest.mark.parametrize("method", METHODS)
def test_kernel_matches_reference(method, isa):
    q = quantizer(method)
    g = torch.Generator().manual_seed(1)
    # ragged 16-row tiles; K = 8192 splits M = 64 into two L2 chunks of 32 rows (int8 tile path),
    # M = 100 into panels of 85 and 15 rows (AVX2 batch path) and into two chunks of 64 (AMX path,
    # which pads it to 128 rows); K = 576: M = 100 into panels of 96 and 4 rows (AVX2)
    shapes = [(192, 576), (64, 96), (64, 8192)] if method == "int4_ic" else [(200, 576), (37, 96), (24, 8192)]
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) * 0.05
        t = q.quantize(w)
        packed = q.pack(t, n)
        for m in (1, 2, 3, 7, 64, 100):  # every int8 tile shape: 4x1, 2x4, 2x2, 2x1, 1xN; AMX batches
            x = torch.randn(m, k, generator=g)
            if method == "llm_int8":
                x[:, 5] = 9.0  # an outlier feature
            exact = kernel_reference(method, t, x, q)
            y = packed.matmul(x)
            scale = exact.abs().max().item()
            assert (y - exact).abs().max().item() <= 1e-4 * scale, f"{method} {n}x{k} M={m}"
            xb = x.bfloat16()
            yb = packed.matmul(xb)
            assert yb.dtype == torch.bfloat16
            exact_b = kernel_reference(method, t, xb.float(), q)
            assert (yb.float() - exact_b).abs().max().item() <= 1e-2 * scale, f"{method} bf16 {n}x{k} M={m}"
            dense = x @ q.dequantize(t).T  # float activations: the int8 activation rounding shows
            assert (y - dense).abs().max().item() <= 0.025 * dense.abs().max().item(), f"{method} vs float"


@pytest.mark.parametrize("method", ["q8_0", "q4_0", "q4_1", "trit_planes", "int8", "int4"])
def test_avx2_matches_the_highest_level_bitwise(method, monkeypatch):
    """The integer dot products are exact and the float epilogues run op for op alike, so the AVX2
    kernel (maddubs) gives the bits of the AVX-512 one (VNNI); batches that take AMX at the amx level
    (rounded to bf16) compare with the avx512 level. Against the scalar level: the kernel tolerance."""
    levels = supported_levels()
    if "avx2" not in levels or levels[-1] == "avx2":
        pytest.skip("no ISA level above avx2 on this CPU")
    g = torch.Generator().manual_seed(5)
    n, k = 200, 576  # ragged tiles
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    xs = {m: torch.randn(m, k, generator=g) for m in (1, 3, 4, 7, 33, 64, 100)}  # 100: two AVX2 panels

    def outputs(level: str) -> dict[int, list[torch.Tensor]]:
        monkeypatch.setenv("INFERA_CPU_ISA", level)  # (a packed weight holds its level's module)
        if kernels() is None:
            pytest.skip(f"the native kernels did not build at ISA level {level}")
        q = quantizer(method)
        packed = q.pack(q.quantize(w), n)
        return {m: [packed.matmul(x, b) for x in (x, x.bfloat16()) for b in (None, bias)] for m, x in xs.items()}

    top = levels[-1]
    ys = {level: outputs(level) for level in {"avx2", "none", top, "avx512" if top == "amx" else top}}
    amx_rows = kernels().AMX_MIN_ROWS
    for m, y in ys["avx2"].items():
        ref = "avx512" if top == "amx" and m >= amx_rows else top
        for i, (a, b) in enumerate(zip(y, ys[ref][m])):
            assert torch.equal(a, b), f"{method} M={m} output {i}: avx2 != {ref}"
        exact = ys["none"][m][0]
        assert (y[0] - exact).abs().max().item() <= 1e-4 * exact.abs().max().item(), f"{method} M={m} vs scalar"


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("int4_ic", "dense_sparse")])
def test_packed_rows_dequantize_exactly(method, isa):
    q = quantizer(method)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    t = q.quantize(w)
    packed = q.pack(t, 40)
    ids = torch.tensor([[0, 39], [17, 3]])
    assert torch.equal(packed.rows(ids, torch.float32), q.dequantize(t)[ids])


def test_llm_int8_outlier_features_beat_plain_int8(isa):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 256, generator=g) * 0.05
    x = torch.randn(4, 256, generator=g) * 0.5
    x[:, [7, 100]] = torch.tensor([40.0, -55.0])  # emergent outlier features
    exact = x @ w.T
    errors = {}
    for method in ("int8", "llm_int8"):
        q = quantizer(method)
        t = q.quantize(w)
        errors[method] = rel_error(q.pack(t, 128).matmul(x), x @ q.dequantize(t).T)
    assert errors["llm_int8"] < 0.2 * errors["int8"], errors
    assert rel_error(quantizer("llm_int8").pack(quantizer("llm_int8").quantize(w), 128).matmul(x), exact) < 0.01


def test_unknown_method_and_bad_options_name_themselves():
    with pytest.raises(ValueError, match="int3"):
        quantization_config("int3")
    with pytest.raises(ValueError, match="group_size"):
        quantization_config("int4", group_size=48)
    with pytest.raises(ValueError, match="int4_ic.*out_features"):
        quantizer("int4_ic").check(100, 64)


def test_gguf_fused_layer_with_mixed_part_types_becomes_q8_0(isa):
    import gguf

    from infera.layers.linear import MergedLinear
    from infera.quant.base import quantization_context
    from infera.quant.gguf_blocks import GGUFConfig

    with quantization_context(GGUFConfig()):
        layer = MergedLinear(64, [32, 16])
    parts = [torch.randn(32, 64), torch.randn(16, 64)]
    raw = [gguf.quants.quantize(p.numpy(), t) for p, t in zip(parts, (gguf.GGMLQuantizationType.Q4_1,
                                                                      gguf.GGMLQuantizationType.Q8_0))]
    for i, (r, name) in enumerate(zip(raw, ("Q4_1", "Q8_0"))):
        layer.weight.weight_loader(layer.weight, GGUFTensor(r, name, tuple(parts[i].shape)), i)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.type_name == "Q8_0" and layer.weight.dtype == torch.uint8
    expected = torch.cat([GGUFTensor(r, n, tuple(p.shape)).dequantize() for r, n, p in
                          zip(raw, ("Q4_1", "Q8_0"), parts)])
    x = torch.randn(3, 64)
    assert rel_error(layer(x), x @ expected.T) < 0.02
