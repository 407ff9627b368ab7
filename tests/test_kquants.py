"""GGUF Q5_0, Q5_1, Q4_K, Q5_K and Q6_K run natively from their blocks, at every ISA level.

Packed rows dequantize to exactly gguf's values. Products: against the kernel's own math (int8
activations per block of 32, per super-block of 256 for the K-quants, or bf16 on AMX) within 1e-4
of max |y|, against float activations times the dequantized weights within 2.5% of max |y| (as
test_quant.py's bounds).
"""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from infera.engine.llm_engine import LLMEngine
from infera.loader.gguf_writer import write_gguf
from infera.quant.gguf_blocks import GGUFTensor, block_layout, pack_blocks, quantize_blocks, to_native
from infera.kernels import supported_levels
from infera.quant.layout import kernels
from conftest import engine_logits
from test_models_vs_hf import PROMPT
from test_quant import quantize_activations

pytestmark = pytest.mark.skipif(kernels() is None, reason="native kernels could not be compiled")

TYPES = ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
BITS = {"Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.625, "Q5_K": 5.625, "Q6_K": 6.5625}  # packed, per weight
SCALES = {"Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fp16 fields in a block


def random_blocks(type_name: str, rows: int, k: int, g: torch.Generator) -> np.ndarray:
    """Blocks of random bytes (every quant, high bit and sub-scale pattern) with fp16 scales of
    sane size (the min of Q5_1 of either sign)."""
    values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    raw = torch.randint(0, 256, (rows, k // values, size), dtype=torch.uint8, generator=g).numpy()
    for i, offset in enumerate(SCALES[type_name]):
        s = torch.rand(rows, k // values, generator=g) * 0.01 + 1e-3
        if type_name == "Q5_1" and i == 1:
            s *= torch.randint(0, 2, s.shape, generator=g) * 2 - 1
        raw[..., offset:offset + 2] = s.half().numpy().view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def test_packed_sizes():
    for type_name, bits in BITS.items():
        assert block_layout(type_name, 4096).bits_per_weight == bits


@pytest.mark.parametrize("type_name", TYPES)
def test_packed_rows_dequantize_to_gguf_values(ext, type_name):
    g = torch.Generator().manual_seed(0)
    n, k = 40, 512
    for raw in (random_blocks(type_name, n, k, g), quantize_blocks(torch.randn(n, k, generator=g), type_name)):
        packed = pack_blocks(torch.from_numpy(raw), type_name, k, n)
        assert packed.data.shape[1] * 8 == BITS[type_name] * k
        exact = GGUFTensor(raw, type_name, (n, k)).dequantize()
        assert torch.equal(ext.dequantize(packed.data, packed.native, n), exact)
        ids = torch.tensor([39, 0, 17])
        assert torch.equal(packed.rows(ids, torch.float32), exact[ids])


@pytest.mark.parametrize("type_name", TYPES)
def test_products_match_the_dequantized_weights(ext, isa, type_name):
    g = torch.Generator().manual_seed(1)
    n, k = 40, 768  # a ragged last tile; 3 super-blocks
    raw = random_blocks(type_name, n, k, g)
    w = GGUFTensor(raw, type_name, (n, k)).dequantize()
    packed = pack_blocks(torch.from_numpy(raw), type_name, k, n)
    bias = torch.randn(n, generator=g)
    for m in (1, 5, 40):  # 40 rows: AMX tiles at the amx level
        x = torch.randn(m, k, generator=g)
        amx = m >= ext.AMX_MIN_ROWS and ext.amx_available()
        own = (x.bfloat16().float() @ w.bfloat16().float().T if amx
               else quantize_activations(x, packed.layout.activation_block) @ w.T) + bias
        dense = x @ w.T + bias
        y = packed.matmul(x, bias)
        scale = dense.abs().max().item()
        assert (y - own).abs().max().item() <= 1e-4 * scale, f"{type_name} {isa} M={m}"
        assert (y - dense).abs().max().item() <= 0.025 * scale, f"{type_name} {isa} M={m} vs float"
        yb = packed.matmul(x.bfloat16(), bias)
        assert yb.dtype == torch.bfloat16
        assert (yb.float() - dense).abs().max().item() <= 0.03 * scale, f"{type_name} {isa} M={m} bf16"


@pytest.mark.parametrize("type_name", TYPES)
def test_avx2_matches_the_avx512_level_bitwise(type_name, monkeypatch):
    """The AVX2 tile kernel (maddubs, the high bits shifted in, sub-scales in the AVX-512 kernel's
    float op order) gives the bits of the avx512 level's (VNNI) at every batch size (the avx512
    level: at the amx level, batches from AMX_MIN_ROWS take AMX in bf16)."""
    levels = supported_levels()
    if "avx2" not in levels or "avx512" not in levels:
        pytest.skip("no avx512 level to compare the avx2 level with on this CPU")
    g = torch.Generator().manual_seed(3)
    n, k = 72, 768  # a ragged last tile (5 tiles: 2 + 2 + 1 at M = 1); 3 super-blocks
    raw = torch.from_numpy(random_blocks(type_name, n, k, g))
    bias = torch.randn(n, generator=g)
    xs = {m: torch.randn(m, k, generator=g) for m in (1, 3, 5, 40)}

    def outputs(level: str) -> dict[int, list[torch.Tensor]]:
        monkeypatch.setenv("INFERA_CPU_ISA", level)  # (a packed weight holds its level's module)
        if kernels() is None:
            pytest.skip(f"the native kernels did not build at ISA level {level}")
        packed = pack_blocks(raw, type_name, k, n)
        return {m: [packed.matmul(x, b) for x in (x, x.bfloat16()) for b in (None, bias)] for m, x in xs.items()}

    avx2, avx512 = outputs("avx2"), outputs("avx512")
    for m, ys in avx2.items():
        for i, (a, b) in enumerate(zip(ys, avx512[m])):
            assert torch.equal(a, b), f"{type_name} M={m} output {i}: avx2 != avx512"


def test_k_quant_gguf_model_runs_on_its_own_blocks(tiny_model, bundled_model_path, tmp_path):
    """A Q4_K_M-like file (Q4_K, Q6_K for ffn_down and the embedding) keeps its types; logits
    within 6% of max |logit| of the same file dequantized (as test_quant_model.py's GGUF bound)."""
    path = str(write_gguf(tiny_model("llama_256"), tmp_path / "k.gguf", bundled_model_path, "Q4_K",
                          {"ffn_down": "Q6_K", "token_embd": "Q6_K"}))
    native = LLMEngine(model=path, dtype="float32", quantization="gguf", kv_cache_memory="32MiB")
    ref = LLMEngine(model=path, dtype="float32", kv_cache_memory="32MiB")  # an explicit dtype dequantizes
    model = native.runner.model.model
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.weight.type_name == "Q4_K"
    assert layer.mlp.gate_up_proj.weight.type_name == "Q4_K"
    assert layer.mlp.down_proj.weight.type_name == "Q6_K"
    assert model.embed_tokens.weight.type_name == "Q6_K"
    assert layer.mlp.down_proj.weight.packed.layout.bits_per_weight == BITS["Q6_K"]
    ids = ref.tokenizer.encode(PROMPT)
    a, b = engine_logits(native, ids, [len(ids)]), engine_logits(ref, ids, [len(ids)])
    assert (a - b).abs().max().item() <= 0.06 * b.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_5_bit_experts_run_on_their_blocks(tiny_model, bundled_model_path, tmp_path):
    path = str(write_gguf(tiny_model("mixtral"), tmp_path / "m.gguf", bundled_model_path, "Q5_0",
                          {"ffn_down_exps": "Q5_1"}))
    native = LLMEngine(model=path, dtype="float32", quantization="gguf", kv_cache_memory="32MiB")
    ref = LLMEngine(model=path, dtype="float32", kv_cache_memory="32MiB")
    expert = native.runner.model.model.layers[0].mlp.experts[1]
    assert expert.gate_up_proj.weight.type_name == "Q5_0" and expert.down_proj.weight.type_name == "Q5_1"
    ids = ref.tokenizer.encode(PROMPT)
    a, b = engine_logits(native, ids, [len(ids)]), engine_logits(ref, ids, [len(ids)])
    assert (a - b).abs().max().item() <= 0.06 * b.abs().max().item()


def test_types_without_a_kernel_requantize_to_q8_0_with_a_log_line(caplog):
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 256, (8, 110), dtype=torch.uint8, generator=g).numpy()  # Q3_K: 110 bytes per 256
    raw[:, 108:110] = np.array([0.01], np.float16).view(np.uint8)
    q3 = GGUFTensor(raw, "Q3_K", (8, 256), "blk.3.attn_q.weight")
    with caplog.at_level(logging.INFO, logger="infera.quant.gguf_blocks"):
        q8 = to_native(q3)
    assert q8.type_name == "Q8_0"
    assert "blk.3.attn_q.weight: Q3_K" in caplog.text
    exact = q3.dequantize()
    assert ((q8.dequantize() - exact).norm() / exact.norm()).item() < 0.01


def test_a_type_gguf_cannot_read_is_a_one_line_error_naming_tensor_and_type():
    t = GGUFTensor(np.zeros((4, 292), np.uint8), "Q8_K", (4, 256), "blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match=r"^blk\.0\.ffn_up\.weight: GGUF type Q8_K cannot be read[^\n]*$"):
        to_native(t)


def test_a_file_with_such_a_type_fails_to_load_with_one_line(tiny_model, bundled_model_path, tmp_path, monkeypatch):
    import infera.quant.gguf_blocks as blocks

    quantize, size = blocks.quantize_blocks, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    fake = lambda w, t: (np.zeros((*w.shape[:-1], w.shape[-1] // 32 * size), np.uint8) if t == "Q8_1"  # noqa: E731
                         else quantize(w, t))
    monkeypatch.setattr(blocks, "quantize_blocks", fake)
    path = write_gguf(tiny_model("llama"), tmp_path / "q81.gguf", bundled_model_path, "Q8_0", {"attn_k": "Q8_1"})
    with pytest.raises(ValueError) as e:
        LLMEngine(model=str(path), dtype="float32", quantization="gguf", kv_cache_memory="16MiB")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "blk.0.attn_k.weight" in message and "Q8_1" in message
