"""Roofline counts against hand-computed values, bound selection, formats, hardware specs, CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from infera.cli import main
from infera.profiler import hardware
from infera.profiler.hardware import HardwareSpec, get_hardware
from infera.profiler.roofline import (ModelShape, StepShape, WeightLayout, analyze, builtin_config, decode_step,
                                      kv_element_bytes, phase_report, prefill_step, resolve_model,
                                      weight_format)

# hidden 64, intermediate 128, 2 layers, 4 query heads and 2 KV heads of 16 (GQA), vocab 1000
TINY = ModelShape("tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, vocab_size=1000)
SPEC = HardwareSpec("test", "ridge 10 FLOP/B in fp32", memory_bandwidth=100e9, flops={"fp32": 1e12, "bf16": 2e12})
FP32 = WeightLayout.uniform(TINY, weight_format("float32"))


def ops_by_name(report):
    return {op.name: op for op in report.operators}


def test_decode_counts_by_hand():
    """Batch 2 decode at context 10, float32 weights and KV (4 bytes)."""
    ops = ops_by_name(analyze(TINY, decode_step(2, 10), SPEC, "float32", FP32))
    qkv = ops["qkv_proj"]  # 2 tokens x 64 in x (64 + 2*32) out, in both layers
    assert qkv.count == 2
    assert qkv.flops == 2 * (2 * 2 * 64 * 128)
    assert qkv.weight_bytes == 2 * (128 * 64 * 4)
    assert (qkv.act_read, qkv.act_write) == (2 * 2 * 64 * 4, 2 * 2 * 128 * 4)
    # attention: each token attends to its 10 cached positions; K and V read once per KV head (GQA)
    scores, weighted = ops["attn_scores"], ops["attn_weighted_sum"]
    assert scores.flops == 2 * (2 * (2 * 10 * 4 * 16))
    assert scores.kv_read == weighted.kv_read == 2 * (2 * 10 * 2 * 16 * 4)
    assert scores.act_read == 2 * (2 * 64 * 4)  # the queries
    assert weighted.act_write == 2 * (2 * 64 * 4)
    assert ops["attn_softmax"].flops == 2 * (5 * 2 * 10 * 4) and ops["attn_softmax"].bytes == 0
    assert ops["kv_cache_write"].kv_write == 2 * (2 * 2 * 32 * 4)
    mlp = ops["gate_up_proj"], ops["silu_mul"], ops["down_proj"]
    assert [op.flops for op in mlp] == [2 * 2 * 2 * 64 * 256, 2 * 5 * 2 * 128, 2 * 2 * 2 * 128 * 64]
    assert mlp[2].weight_bytes == 2 * (64 * 128 * 4)
    head = ops["lm_head"]  # both rows sample
    assert (head.flops, head.weight_bytes, head.act_write) == (2 * 2 * 64 * 1000, 1000 * 64 * 4, 2 * 1000 * 4)


def test_prefill_counts_by_hand():
    """One 8-token prompt: causal pairs 8*9/2 = 36, fresh K/V read from activations, one logits row."""
    report = analyze(TINY, prefill_step(1, 8), SPEC, "float32", FP32)
    ops = ops_by_name(report)
    scores = ops["attn_scores"]
    assert scores.flops == 2 * (2 * 36 * 4 * 16)
    assert scores.act_read == 2 * (8 * 64 * 4 + 8 * 32 * 4) and scores.kv_read == 0
    assert ops["gate_up_proj"].flops == 2 * (2 * 8 * 64 * 256)
    assert ops["lm_head"].flops == 2 * 64 * 1000 and ops["lm_head"].act_read == 64 * 4
    assert report.tokens == 8
    assert report.total_flops == sum(op.flops for op in report.operators)
    assert report.tok_s_ceiling == pytest.approx(8 / report.predicted_s)


def test_chunked_prefill_reads_the_cache():
    """A 4-token chunk ending at context 12 attends to 9+10+11+12 = 42 positions, K/V from the cache."""
    ops = ops_by_name(analyze(TINY, StepShape(((4, 12),), 0), SPEC, "float32", FP32, kv_dtype="int8"))
    assert ops["attn_scores"].flops == 2 * (2 * 42 * 4 * 16)
    assert ops["attn_scores"].kv_read == 2 * (12 * 32 * (1 + 4 / 16))  # int8 plus a float32 scale per head
    assert ops["lm_head"].flops == 0  # the chunk does not reach the prompt's end: no logits


def test_quantized_weight_bytes():
    q4_0 = WeightLayout.uniform(TINY, weight_format("q4_0"))
    ops = ops_by_name(analyze(TINY, decode_step(1, 4), SPEC, "bfloat16", q4_0))
    assert ops["qkv_proj"].weight_bytes == 2 * (128 * 64 * 4.5 / 8)
    assert ops["qkv_proj"].act_read == 2 * (64 * 2)  # bf16 activations
    assert ops["embedding"].weight_bytes == 64 * 4.5 / 8  # one row gathered
    bits = {name: weight_format(name).bits_per_weight(4096) for name in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")}
    assert bits == {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.5, "q6_k": 6.5625}
    assert weight_format("int8").bits_per_weight(64) == 8 + 16 / 64  # one 16-bit scale per output row
    assert weight_format("int4", group_size=32).bits_per_weight(4096) == 4.5
    assert kv_element_bytes("bfloat16", 64) == 2
    with pytest.raises(ValueError, match="q3_x"):
        weight_format("q3_x")


def test_gguf_layout_is_the_files_tensor_sizes(bundled_model_path):
    shape, layout = resolve_model(str(bundled_model_path), None, "bfloat16")  # a GGUF: its own tensor types
    assert layout.matrix_bytes("embed_tokens", None) == 49152 * 576 * 8.5 / 8  # Q8_0
    assert layout.matrix_bytes("lm_head", None) == layout.matrix_bytes("embed_tokens", None)  # tied
    assert layout.matrix_bytes("qkv_proj", 0) == (576 * 576 + 2 * 192 * 576) * 5 / 8  # Q4_1
    assert layout.description == "q4_1 (embedding q8_0, tied lm_head)"
    builtin = ModelShape.from_config(builtin_config("smollm2-135m"))
    assert replace(builtin, name=shape.name) == shape and builtin.num_parameters == 134515008  # HF's count


def test_bound_memory_for_decode_compute_for_long_prefill():
    decode = phase_report(TINY, "decode", 1, 512, SPEC, "float32", FP32)
    assert decode.bound == "memory"
    assert ops_by_name(decode)["qkv_proj"].bound == "memory"
    prefill = phase_report(TINY, "prefill", 1, 2048, SPEC, "float32", FP32)
    assert prefill.bound == "compute"
    assert ops_by_name(prefill)["attn_scores"].bound == "compute"
    assert prefill.predicted_s == pytest.approx(sum(max(op.flops / SPEC.peak_flops(
        "float32"), op.bytes / SPEC.memory_bandwidth) for op in prefill.operators))


def test_gpu_table_and_aliases():
    h100 = get_hardware("H100")
    assert h100.name == "h100-sxm" and h100.memory_bandwidth == 3.35e12
    assert h100.peak_flops("bfloat16") == pytest.approx(989.5e12)
    assert "fp8" not in get_hardware("a100").flops
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu")


def test_local_hardware_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERA_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_calibrate(device, description=""):
        calls.append(device)
        return HardwareSpec("local", description, 20e9, {"fp32": 1e11, "bf16": 2e11})

    monkeypatch.setattr(hardware, "calibrate", fake_calibrate)
    first = get_hardware("local", device="cpu")
    again = get_hardware("local", device="cpu")
    assert len(calls) == 1 and again == first and (tmp_path / "hardware.json").exists()
    get_hardware("local", recalibrate=True, device="cpu")
    assert len(calls) == 2


def test_calibrate_measures_positive_rates():
    import torch

    spec = hardware.calibrate(torch.device("cpu"), memory_mib=8, matmul_n=64, repeats=1, budget_s=0)
    assert spec.memory_bandwidth > 0 and spec.flops["fp32"] > 0 and spec.flops["bf16"] > 0


def test_cli_json_and_plot(capsys, tmp_path):
    png = tmp_path / "roofline.png"
    assert main(["roofline", "--config", "qwen3-0.6b", "--hardware", "h100", "--batch", "1", "--context", "256",
                 "--quantization", "int4", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"total_flops", "total_bytes", "bound", "predicted_s", "tok_s_ceiling", "operators"} <= set(out)
    assert out["bound"] == "memory" and out["weights"] == "int4-g128"
    assert "qk_norm" in {op["name"] for op in out["operators"]}  # Qwen3 normalizes q and k heads
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["roofline", "--config", "smollm2-135m", "--hardware", "l40s", "--phase", "both", "--batch", "1,64",
                 "--quantization", "q4_1", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert [(r["phase"], r["batch"]) for r in reports] == [("prefill", 1), ("prefill", 64), ("decode", 1),
                                                           ("decode", 64)]
    assert reports[0]["weights"] == "q4_1"


def test_cli_table_and_errors(capsys):
    assert main(["roofline", "--config", "llama-3-8b", "--hardware", "a100", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "whole model" in out and "one decoder layer" in out and "tok/s" in out
    assert main(["roofline", "--config", "smollm2-135m", "--hardware", "h100", "--batch", "0"]) == 2
    assert "batch and context must be >= 1" in capsys.readouterr().err
    assert main(["roofline", "--hardware", "tpu"]) == 2


def test_cli_counts_the_format_that_runs(capsys, monkeypatch, tmp_path):
    """A GGUF runs on its own tensors only with the auto dtype on the CPU; an explicit dtype or a
    GPU dequantizes it, and the roofline counts those bytes."""
    monkeypatch.setattr(hardware, "calibrate", lambda device, description="": HardwareSpec(
        "local", description, 20e9, {"fp32": 1e11, "bf16": 2e11}))
    monkeypatch.setenv("INFERA_CACHE_DIR", str(tmp_path))
    weights = {}
    for extra in ([], ["--dtype", "bfloat16"], ["--dtype", "float32"]):
        assert main(["roofline", "--hardware", "local", "--recalibrate", "--json", *extra]) == 0
        weights[tuple(extra)] = json.loads(capsys.readouterr().out)["weights"]
    assert weights[()].startswith("q4_1") and weights[("--dtype", "bfloat16")] == "bfloat16"
    assert weights[("--dtype", "float32")] == "float32"
    assert main(["roofline", "--hardware", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "bfloat16"
