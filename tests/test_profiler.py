"""`infera profile`: per-step accounting, operator ranges, prediction beside measurement; TKLQT parsing."""
from __future__ import annotations

import json

import pytest

from infera.cli import main
from infera.profiler.hardware import get_hardware
from infera.profiler.profile import (classify_bound, launch_queue_times, module_layout, operator_modules, profile)
from infera.profiler.roofline import ModelShape

ROOFLINE_GROUPS = {"embedding", "rmsnorm", "qkv_proj", "rope", "attention", "o_proj", "gate_up_proj", "silu_mul",
                   "down_proj", "final_norm", "lm_head"}


def test_profile_cli_steps_fit_in_wall_time(tiny_model, capsys, tmp_path):
    png = tmp_path / "profile.png"
    argv = ["profile", "--model", str(tiny_model("llama")), "--dtype", "float32", "--kv-cache-memory", "32MiB",
            "--workload", "decode", "--batch", "3", "--prompt-len", "12", "--output-len", "5",
            "--hardware", "h100", "--json", "--plot", str(png)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    steps = report["steps"]
    assert len(steps) == 4  # the first token comes from the (unprofiled) prefill
    for s in steps:
        assert (s["tokens"], s["seqs"]) == (3, 3)
        assert 0 < s["op_ms"] <= s["wall_ms"]
        assert s["outside_ms"] >= 0
        assert s["op_ms"] + s["outside_ms"] == pytest.approx(s["wall_ms"])
        assert 0 < s["schedule_ms"] + s["prepare_inputs_ms"] <= s["outside_ms"]  # host work, outside operators
        assert s["predicted_ms"] > 0
    ops = {op["operator"]: op for op in report["operators"]}
    assert set(ops) == ROOFLINE_GROUPS
    for op in ops.values():
        assert op["measured_ms"] > 0 and op["predicted_ms"] > 0
    assert ops["qkv_proj"]["calls"] == 4 * 2  # 4 steps x 2 layers
    assert ops["rmsnorm"]["calls"] == 4 * 2 * 2
    assert sum(op["measured_ms"] for op in ops.values()) == pytest.approx(report["totals"]["op_ms"])
    assert "sweep" not in report  # CUDA only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_prefill_and_mixed_cover_every_token(tiny_llm):
    engine = tiny_llm.engine
    hw = get_hardware("a100")
    prefill = profile(engine, hw, "prefill", batch=2, prompt_len=20, output_len=1)
    assert sum(s["tokens"] for s in prefill.steps) == 2 * 20
    assert "CUDA only" in prefill.table()
    mixed = profile(engine, hw, "mixed", batch=2, prompt_len=6, output_len=3)
    assert sum(s["tokens"] for s in mixed.steps) == 2 * 6 + 2 * 2  # prompts, then 2 more tokens each
    assert all(s["op_ms"] <= s["wall_ms"] for s in mixed.steps)
    assert not engine.has_unfinished_requests()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine.runner.model.modules())
    assert not {"execute", "prepare_inputs"} & set(vars(engine.runner)) and "schedule" not in vars(engine.scheduler)
    with pytest.raises(ValueError, match="workload"):
        profile(engine, hw, "train")


def test_module_layout_counts_loaded_weights(tiny_llm):
    model = tiny_llm.engine.runner.model
    shape = ModelShape.from_config(tiny_llm.engine.hf_config)
    layout = module_layout(model, shape)
    assert layout.matrix_bytes("qkv_proj", 1) == (64 + 2 * 32) * 64 * 4  # float32 [128, 64]
    assert layout.matrix_bytes("lm_head", None) == 49152 * 64 * 4
    kinds = sorted(set(operator_modules(model).values()))
    assert set(kinds) == ROOFLINE_GROUPS


def test_launch_queue_times_from_trace_events():
    """Kernel start minus its launch call's start, summed per step; kernels matched by correlation id."""
    trace = [
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100.0, "dur": 5, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "gemm", "ts": 108.0, "dur": 20, "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 110.0, "dur": 5, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "norm", "ts": 128.0, "dur": 4, "args": {"correlation": 2}},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 300.0, "dur": 5, "args": {"correlation": 3}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 303.0, "dur": 2, "args": {"correlation": 3}},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 99.0, "dur": 10, "args": {}},
    ]
    steps = launch_queue_times(trace, [(90.0, 200.0), (250.0, 400.0)])
    assert steps[0] == {"tklqt_us": (108 - 100) + (128 - 110), "kernel_us": 24.0, "kernels": 2}
    assert steps[1] == {"tklqt_us": 3.0, "kernel_us": 2.0, "kernels": 1}


def test_classify_bound_finds_the_transition():
    sweep = [{"batch": b, "tklqt_per_kernel_us": q, "kernel_ms": k, "wall_ms": 10.0}
             for b, q, k in [(1, 5.0, 2.0), (8, 6.0, 4.0), (32, 15.0, 7.0), (64, 40.0, 9.5)]]
    assert classify_bound(sweep) == 32
    assert [r["bound"] for r in sweep] == ["CPU", "CPU", "GPU", "GPU"]
    busy = [{"batch": 1, "tklqt_per_kernel_us": 50.0, "kernel_ms": 9.5, "wall_ms": 10.0}]
    assert classify_bound(busy) == 1  # GPU busy from the start
