"""``infera profile``: run the engine on a workload under torch.profiler and put the measured
time of each operator type beside its roofline prediction.

Each operator module of the model (found by its vLLM-style name: ``qkv_proj``, ``attn``,
``gate_up_proj``...) is wrapped in a ``record_function`` range, and each engine step in another.
Per step, the time outside operators is the step's wall time minus the summed operator time;
the scheduler's and the runner's batch building share of it are measured in ranges of their own,
the rest is sampling, output processing and Python dispatch. On CUDA the operator time is the device
time of its kernels, and the profile adds the Total Kernel Launch and Queuing Time (TKLQT) of
the GH200 study (Vellaisamy et al., 2025): the sum over kernels of (kernel start on the GPU -
start of its launch call on the CPU). Sweeping batch sizes locates where the run turns from
CPU-bound (the GPU waits for launches; TKLQT stays at launch latency) to GPU-bound (kernels
queue behind each other; TKLQT per kernel grows).
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import json
import logging
import random
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from infera.engine.llm_engine import LLMEngine
from infera.engine.scheduler import ScheduledBatch
from infera.models import llama_native
from infera.profiler.hardware import HardwareSpec
from infera.profiler.roofline import ModelShape, StepShape, WeightLayout, analyze
from infera.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STEP = "infera.step"
OP_PREFIX = "infera.op::"
HOST_PREFIX = "infera.host::"
WORKLOADS = ["decode", "prefill", "mixed"]
# last component of a module's name -> operator type (the roofline's Operator.group)
MODULE_OPERATORS = {
    "embed_tokens": "embedding", "input_layernorm": "rmsnorm", "post_attention_layernorm": "rmsnorm",
    "qkv_proj": "qkv_proj", "q_norm": "qk_norm", "k_norm": "qk_norm", "rotary": "rope", "attn": "attention",
    "o_proj": "o_proj", "gate_up_proj": "gate_up_proj", "act": "silu_mul", "down_proj": "down_proj",
    "norm": "final_norm", "lm_head": "lm_head",
}
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")
GPU_BOUND_QUEUE_FACTOR = 2.0  # launch+queue time per kernel this many times the smallest batch's
GPU_BOUND_BUSY = 0.9  # or the GPU busy this fraction of the step


# ---- instrumentation --------------------------------------------------------------------------

def operator_modules(model: nn.Module) -> dict[nn.Module, str]:
    """The model's operator modules and their operator types."""
    found: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        op = MODULE_OPERATORS.get(name.rsplit(".", 1)[-1])
        if op is not None:
            found.setdefault(module, op)
    return found


class OperatorRanges:
    """Wrap each operator module's forward in a profiler range named ``infera.op::TYPE``. The
    modules run one by one meanwhile: the native decoder stack (which decode steps on the CPU take
    otherwise) would bypass them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[Any] = []
        self.native = llama_native.ENABLED

    def __enter__(self) -> OperatorRanges:
        llama_native.ENABLED = False
        open_ranges: list[record_function] = []
        for module, op in operator_modules(self.model).items():
            def pre(_m, _args, label=OP_PREFIX + op):
                open_ranges.append(record_function(label).__enter__())

            def post(_m, _args, _out):
                open_ranges.pop().__exit__(None, None, None)

            self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        llama_native.ENABLED = self.native


class EngineRecorder:
    """Record the shape of every batch the model runner executes, and put the host-side calls of
    a step (scheduling, batch building) in ``infera.host::NAME`` ranges. Wraps instance methods
    for the duration and restores them."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.shapes: list[StepShape] = []
        self.patched: list[tuple[Any, str]] = []

    def _wrap(self, owner: Any, method: str, label: str | None) -> None:
        fn = getattr(owner, method, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            if label is None:  # the runner's execute: record the batch shape
                self.shapes.append(batch_shape(args[0]))
                return fn(*args, **kwargs)
            with record_function(HOST_PREFIX + label):
                return fn(*args, **kwargs)

        setattr(owner, method, wrapper)
        self.patched.append((owner, method))

    def __enter__(self) -> EngineRecorder:
        self._wrap(self.engine.runner, "execute", None)
        self._wrap(self.engine.scheduler, "schedule", "schedule")
        self._wrap(self.engine.runner, "prepare_inputs", "prepare_inputs")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, method in self.patched:
            delattr(owner, method)
        self.patched.clear()


def batch_shape(batch: ScheduledBatch) -> StepShape:
    queries = tuple((n, s.num_computed_tokens + n) for s, n in zip(batch.seqs, batch.num_new_tokens))
    logits = sum(1 for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens)
    return StepShape(queries, logits)


def module_layout(model: nn.Module, shape: ModelShape) -> WeightLayout:
    """Weight bytes as the loaded model holds them: every parameter and buffer of each weight
    module except biases (the roofline adds those), whatever its storage format."""
    modules = dict(model.named_modules())

    def module_bytes(name: str) -> float:
        m = modules[name]
        tensors = [t for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if n != "bias"]
        return float(sum(t.numel() * t.element_size() for t in tensors))

    def matrix_bytes(name: str, layer: int | None) -> float:
        if name == "embed_tokens":
            return module_bytes("model.embed_tokens")
        if name == "lm_head":
            return module_bytes("lm_head")
        attn = name in ("qkv_proj", "o_proj")
        return module_bytes(f"model.layers.{layer}.{'self_attn' if attn else 'mlp'}.{name}")

    def bits(name: str, layer: int | None) -> float:
        return 8 * matrix_bytes(name, layer) / sum(r * c for r, c in shape.matrices(name))

    method = type(getattr(modules["model.layers.0.self_attn.qkv_proj"], "quant_method", None)).__name__
    return WeightLayout(f"as loaded: {bits('qkv_proj', 0):.2f} bits/weight in layers, "
                        f"{bits('embed_tokens', None):.2f} in the embedding ({method})", matrix_bytes)


# ---- CUDA launch and queuing time -------------------------------------------------------------

def launch_queue_times(trace_events: list[dict[str, Any]],
                       steps: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Per step ``(start_us, end_us)`` (sorted, disjoint): TKLQT (sum over device activities launched in the step of
    their GPU start minus their launch call's CPU start), kernel busy time, and kernel count,
    from Chrome-trace events of torch.profiler (launch calls and kernels share a correlation id)."""
    launches: dict[int, float] = {}
    for e in trace_events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = float(e["ts"])
    out = [{"tklqt_us": 0.0, "kernel_us": 0.0, "kernels": 0} for _ in steps]
    starts = [start for start, _ in steps]
    for e in trace_events:
        if e.get("cat") not in DEVICE_ACTIVITIES:
            continue
        launched = launches.get(e.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, launched) - 1 if launched is not None else -1
        if i >= 0 and launched <= steps[i][1]:
            out[i]["tklqt_us"] += float(e["ts"]) - launched
            out[i]["kernel_us"] += float(e.get("dur", 0.0))
            out[i]["kernels"] += 1
    return out


def classify_bound(sweep: list[dict[str, float]]) -> int | None:
    """Mark each sweep row CPU- or GPU-bound; return the first GPU-bound batch size (None if none).

    A batch is GPU-bound when its launch+queue time per kernel reaches GPU_BOUND_QUEUE_FACTOR times
    the smallest batch's (kernels now wait behind others), or the GPU is busy GPU_BOUND_BUSY of the step.
    """
    if not sweep:
        return None
    base = max(sweep[0]["tklqt_per_kernel_us"], 1e-9)
    transition = None
    for row in sweep:
        gpu = (row["tklqt_per_kernel_us"] >= GPU_BOUND_QUEUE_FACTOR * base
               or row["kernel_ms"] >= GPU_BOUND_BUSY * row["wall_ms"])
        row["bound"] = "GPU" if gpu else "CPU"
        if gpu and transition is None:
            transition = int(row["batch"])
    return transition


# ---- the run ----------------------------------------------------------------------------------

@dataclass
class ProfileReport:
    model: str
    device: str
    hardware: str
    dtype: str
    weights: str
    kv_cache_dtype: str
    workload: str
    batch: int
    prompt_len: int
    output_len: int
    operators: list[dict[str, Any]]  # per operator type: calls, measured_ms, predicted_ms, fraction
    steps: list[dict[str, Any]]  # per step: tokens, seqs, wall_ms, op_ms, outside_ms, predicted_ms (+ CUDA)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    cpu_gpu_transition_batch: int | None = None

    @property
    def totals(self) -> dict[str, float]:
        wall = sum(s["wall_ms"] for s in self.steps)
        ops = sum(s["op_ms"] for s in self.steps)
        predicted = sum(s["predicted_ms"] for s in self.steps)
        tokens = sum(s["tokens"] for s in self.steps)
        return {"steps": len(self.steps), "tokens": tokens, "wall_ms": wall, "op_ms": ops,
                "outside_ms": wall - ops, "schedule_ms": sum(s["schedule_ms"] for s in self.steps),
                "prepare_inputs_ms": sum(s["prepare_inputs_ms"] for s in self.steps), "predicted_ms": predicted,
                "tok_s": 1e3 * tokens / wall if wall else 0.0,
                "tok_s_ceiling": 1e3 * tokens / predicted if predicted else 0.0,
                "fraction_of_bound": predicted / wall if wall else 0.0}

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("model", "device", "hardware", "dtype", "weights", "kv_cache_dtype",
                                           "workload", "batch", "prompt_len", "output_len")}
        d.update(totals=self.totals, operators=self.operators, steps=self.steps)
        if self.device.startswith("cuda"):
            d.update(sweep=self.sweep, cpu_gpu_transition_batch=self.cpu_gpu_transition_batch)
        return d

    def table(self) -> str:
        t = self.totals
        lines = [f"{self.model} on {self.device} ({self.dtype}, weights {self.weights}, KV {self.kv_cache_dtype}); "
                 f"workload {self.workload}: batch {self.batch}, prompt {self.prompt_len}, output {self.output_len}; "
                 f"prediction on {self.hardware}", "",
                 f"{'operator':<16}{'calls':>7}{'measured ms':>13}{'predicted ms':>14}{'of bound':>10}"]
        for op in self.operators:
            frac = f"{100 * op['fraction_of_bound']:.3g}%" if op["measured_ms"] else "-"
            lines.append(f"{op['operator']:<16}{op['calls']:>7}{op['measured_ms']:>13.3f}"
                         f"{op['predicted_ms']:>14.3f}{frac:>10}")
        lines += ["", f"{t['steps']} steps, {t['tokens']} tokens: wall {t['wall_ms']:.1f} ms = operators "
                      f"{t['op_ms']:.1f} ms + outside operators {t['outside_ms']:.1f} ms "
                      f"({100 * t['outside_ms'] / max(t['wall_ms'], 1e-9):.0f}%: scheduling "
                      f"{t['schedule_ms']:.1f} ms, building inputs {t['prepare_inputs_ms']:.1f} ms, the rest "
                      f"sampling, output processing and Python dispatch)",
                  f"throughput {t['tok_s']:,.1f} tok/s under the profiler; roofline ceiling "
                  f"{t['tok_s_ceiling']:,.0f} tok/s ({100 * t['fraction_of_bound']:.3g}% of the bound)", "",
                  f"{'step':>5}{'tokens':>8}{'seqs':>6}{'wall ms':>10}{'ops ms':>9}{'outside ms':>12}"
                  f"{'(sched':>8}{'inputs)':>9}{'pred ms':>10}"
                  + (f"{'TKLQT ms':>10}{'kernel ms':>11}" if self.device.startswith("cuda") else "")]
        shown = self.steps if len(self.steps) <= 12 else self.steps[:6] + self.steps[-6:]
        for s in shown:
            if len(self.steps) > 12 and s is self.steps[-6]:
                lines.append(f"{'...':>5}")
            line = (f"{s['step']:>5}{s['tokens']:>8}{s['seqs']:>6}{s['wall_ms']:>10.2f}{s['op_ms']:>9.2f}"
                    f"{s['outside_ms']:>12.2f}{s['schedule_ms']:>8.2f}{s['prepare_inputs_ms']:>9.2f}"
                    f"{s['predicted_ms']:>10.3f}")
            if "tklqt_ms" in s:
                line += f"{s['tklqt_ms']:>10.3f}{s['kernel_ms']:>11.3f}"
            lines.append(line)
        lines.append("")
        if not self.device.startswith("cuda"):
            lines.append("kernel launch and queuing time (TKLQT) and the CPU-/GPU-bound transition apply to "
                         "CUDA only: on the CPU every operator runs synchronously in the calling thread.")
        elif self.sweep:
            lines.append(f"{'batch':>6}{'step ms':>10}{'kernel ms':>11}{'TKLQT ms':>10}{'us/kernel':>11}  bound")
            for r in self.sweep:
                lines.append(f"{r['batch']:>6}{r['wall_ms']:>10.3f}{r['kernel_ms']:>11.3f}{r['tklqt_ms']:>10.3f}"
                             f"{r['tklqt_per_kernel_us']:>11.2f}  {r['bound']}")
            lines.append("CPU-bound up to batch " + (
                f"{self.cpu_gpu_transition_batch}, GPU-bound from there" if self.cpu_gpu_transition_batch
                else f"{self.sweep[-1]['batch']} at least (no GPU-bound batch in the sweep)"))
        return "\n".join(lines)


def _prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(count)]


def _run_steps(engine: LLMEngine, until_first_tokens: bool = False) -> None:
    """Step until every request finished, or (``until_first_tokens``) until all have a token."""
    while engine.has_unfinished_requests():
        if until_first_tokens and all(all(len(s) > s.num_prompt_tokens for s in r.seqs)
                                      for r in engine.requests.values()):
            return
        engine.step()


def _profiled_steps(engine: LLMEngine, activities: list[ProfilerActivity], model: nn.Module | None):
    """Step to the end under the profiler, each step in an ``infera.step`` range."""
    ranges = OperatorRanges(model) if model is not None else contextlib.nullcontext()
    with torch.profiler.profile(activities=activities) as prof, ranges:
        while engine.has_unfinished_requests():
            with record_function(STEP):
                engine.step()
    return prof


def _add_workload(engine: LLMEngine, workload: str, batch: int, prompt_len: int, output_len: int,
                  seed: int) -> None:
    params = SamplingParams(max_tokens=1 if workload == "prefill" else output_len, ignore_eos=True, temperature=0.0)
    for prompt in _prompts(batch, prompt_len, engine.runner.vocab_size, seed):
        engine.add_request(prompt, params)
    if workload == "decode":  # prefill outside the profile
        _run_steps(engine, until_first_tokens=True)


def _trace_events(prof: Any) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text()).get("traceEvents", [])


def _step_ranges(trace: list[dict[str, Any]]) -> list[tuple[float, float]]:
    steps = [e for e in trace if e.get("name") == STEP and e.get("cat") == "user_annotation"]
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in steps)


def profile(engine: LLMEngine, hw: HardwareSpec, workload: str = "decode", batch: int = 1,
            prompt_len: int = 128, output_len: int = 32, sweep_batches: list[int] | None = None,
            seed: int = 0) -> ProfileReport:
    """Run ``workload`` on ``engine`` under torch.profiler and compare with the roofline on ``hw``."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if workload == "decode" and output_len < 2:
        raise ValueError("the decode workload needs output_len >= 2 (the first token comes from the prefill)")
    if prompt_len + output_len > engine.max_model_len:
        raise ValueError(f"prompt_len + output_len = {prompt_len + output_len} exceeds the context length "
                         f"{engine.max_model_len}")
    if engine.has_unfinished_requests():
        raise ValueError("the engine has unfinished requests; profile an idle engine")
    model = engine.runner.model
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    shape = ModelShape.from_config(engine.hf_config, Path(engine.model_path).name)
    layout = module_layout(model, shape)
    dtype = str(engine.dtype).removeprefix("torch.")
    cache = getattr(engine.runner, "kv_cache", None)
    kv_dtype = str(cache.dtype).removeprefix("torch.") if cache is not None else dtype

    _add_workload(engine, "mixed", 1, min(8, prompt_len), 3, seed + 1)  # warm-up: a prefill and two decodes
    _run_steps(engine)
    _add_workload(engine, workload, batch, prompt_len, output_len, seed)
    with EngineRecorder(engine) as recorder:
        prof = _profiled_steps(engine, activities, model)

    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    step_events = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    op_events = sorted((e for e in events if e.name.startswith((OP_PREFIX, HOST_PREFIX))),
                       key=lambda e: e.time_range.start)
    if len(step_events) != len(recorder.shapes):
        raise RuntimeError(f"profiled {len(step_events)} steps but the runner executed {len(recorder.shapes)}")
    measured: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    predicted: dict[str, float] = defaultdict(float)
    steps: list[dict[str, Any]] = []
    j = 0
    for i, (ev, step_shape) in enumerate(zip(step_events, recorder.shapes)):
        op_us = 0.0
        host_ms: dict[str, float] = defaultdict(float)
        while j < len(op_events) and op_events[j].time_range.start < ev.time_range.end:
            op = op_events[j]
            if op.time_range.start >= ev.time_range.start and op.name.startswith(HOST_PREFIX):
                host_ms[op.name[len(HOST_PREFIX):] + "_ms"] += op.cpu_time_total / 1e3
            elif op.time_range.start >= ev.time_range.start:
                t = op.device_time_total if cuda else op.cpu_time_total
                group = op.name[len(OP_PREFIX):]
                measured[group] += t / 1e3
                calls[group] += 1
                op_us += t
            j += 1
        rep = analyze(shape, step_shape, hw, dtype, layout, kv_dtype)
        for op in rep.operators:
            predicted[op.group] += op.time_s * 1e3
        wall_us = ev.time_range.elapsed_us()
        steps.append({"step": i, "tokens": step_shape.num_tokens, "seqs": step_shape.num_seqs,
                      "wall_ms": wall_us / 1e3, "op_ms": op_us / 1e3, "outside_ms": (wall_us - op_us) / 1e3,
                      "schedule_ms": host_ms["schedule_ms"], "prepare_inputs_ms": host_ms["prepare_inputs_ms"],
                      "predicted_ms": rep.predicted_s * 1e3})
    if cuda:
        trace = _trace_events(prof)
        for s, q in zip(steps, launch_queue_times(trace, _step_ranges(trace))):
            s.update(tklqt_ms=q["tklqt_us"] / 1e3, kernel_ms=q["kernel_us"] / 1e3, kernels=q["kernels"])
    order = list(dict.fromkeys([*predicted, *measured]))
    operators = [{"operator": g, "calls": calls[g], "measured_ms": measured[g], "predicted_ms": predicted[g],
                  "fraction_of_bound": predicted[g] / measured[g] if measured[g] else 0.0} for g in order]
    report = ProfileReport(shape.name, str(engine.device), hw.name, dtype, layout.description, kv_dtype, workload,
                           batch, prompt_len, output_len, operators, steps)
    if cuda:
        report.sweep = batch_sweep(engine, sweep_batches or [1, 2, 4, 8, 16, 32, 64, 128, 256], prompt_len,
                                   min(output_len, 16), seed)
        report.cpu_gpu_transition_batch = classify_bound(report.sweep)
    return report


def batch_sweep(engine: LLMEngine, batches: list[int], prompt_len: int, output_len: int,
                seed: int) -> list[dict[str, Any]]:
    """Decode at each batch size under the CUDA profiler: per step, wall, kernel busy time and TKLQT."""
    rows = []
    output_len = max(output_len, 2)
    for b in sorted(set(batches)):
        if b > engine.config.max_num_seqs:
            logger.warning("sweep stops at batch %d: --max-num-seqs is %d", b, engine.config.max_num_seqs)
            break
        _add_workload(engine, "decode", b, prompt_len, output_len, seed)
        trace = _trace_events(_profiled_steps(engine, [ProfilerActivity.CPU, ProfilerActivity.CUDA], None))
        ranges = _step_ranges(trace)
        stats = launch_queue_times(trace, ranges)
        n = max(len(stats), 1)
        kernels = sum(s["kernels"] for s in stats)
        tklqt = sum(s["tklqt_us"] for s in stats)
        rows.append({"batch": b, "steps": len(stats), "wall_ms": sum(e - s for s, e in ranges) / n / 1e3,
                     "kernel_ms": sum(s["kernel_us"] for s in stats) / n / 1e3, "tklqt_ms": tklqt / n / 1e3,
                     "kernels_per_step": kernels / n, "tklqt_per_kernel_us": tklqt / max(kernels, 1)})
        logger.info("sweep batch %d: %s", b, rows[-1])
    return rows

