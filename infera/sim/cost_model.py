"""What one simulated step costs: a linear model of a step's time in the shape of its batch, fitted
to measured steps of this engine (:func:`measure_engine`) or to the roofline of a model on a GPU
(:func:`roofline_samples`), saved as JSON with the limits of the replica it describes.

The features of a step, for its sequences ``i`` computing ``n_i`` new tokens after ``c_i`` cached:
``step`` (1: fixed overhead, weights read once), ``tokens`` (sum n_i: the matmuls), ``seqs`` (the
batch size: per-sequence work such as sampling), ``context`` (sum c_i + n_i: KV read by attention)
and ``attention`` (sum of causal score pairs n_i c_i + n_i (n_i + 1) / 2: attention FLOPs of
prompt chunks).
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from infera.engine.llm_engine import LLMEngine
    from infera.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

FEATURES = ("step", "tokens", "seqs", "context", "attention")
Features = tuple[float, float, float, float, float]


def step_features(queries: Iterable[tuple[int, int]]) -> Features:
    """The features of a step from ``(cached tokens, new tokens)`` per sequence."""
    tokens = seqs = context = attention = 0
    for cached, n in queries:
        tokens += n
        seqs += 1
        context += cached + n
        attention += n * cached + n * (n + 1) // 2
    return 1.0, tokens, seqs, context, attention


def batch_features(batch: ScheduledBatch) -> Features:
    """The features of a scheduled batch, before its tokens are committed."""
    return step_features(zip((s.num_computed_tokens for s in batch.seqs), batch.num_new_tokens))


@dataclass(frozen=True)
class ReplicaLimits:
    """The engine a cost model was measured (or modelled) with: KV capacity and step limits."""

    num_kv_tokens: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024
    kv_bytes_per_token: int = 0  # K and V of one token in all layers (what a KV transfer moves); 0: unknown


@dataclass
class CostModel:
    coefficients: dict[str, float]  # seconds per unit of each feature
    replica: ReplicaLimits
    source: str = ""  # what was measured or modelled
    fit_error: float = 0.0  # RMS relative error of the fit on its samples
    num_samples: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost-model features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        self._coef = tuple(self.coefficients.get(f, 0.0) for f in FEATURES)

    def step_time(self, features: Features) -> float:
        return sum(c * x for c, x in zip(self._coef, features))

    def to_dict(self) -> dict:
        return {"source": self.source, "coefficients": self.coefficients, "replica": asdict(self.replica),
                "fit_error": self.fit_error, "num_samples": self.num_samples, **self.extra}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        d = json.loads(Path(path).read_text())
        extra = {k: v for k, v in d.items() if k not in ("source", "coefficients", "replica", "fit_error",
                                                          "num_samples")}
        return cls(d["coefficients"], ReplicaLimits(**d["replica"]), d.get("source", ""), d.get("fit_error", 0.0),
                   d.get("num_samples", 0), extra)


def fit(samples: Sequence[tuple[Features, float]]) -> tuple[dict[str, float], float]:
    """Least-squares coefficients (non-negative, relative error) for ``(features, seconds)`` samples,
    and the fit's RMS relative error.  A feature whose coefficient comes out negative is dropped
    and the rest refitted (the features overlap: tokens and attention both grow with a prompt)."""
    if not samples:
        raise ValueError("no step samples to fit")
    x = np.array([f for f, _ in samples], dtype=np.float64)
    y = np.array([s for _, s in samples], dtype=np.float64)
    if (y <= 0).any():
        raise ValueError("step times must be positive")
    a, b = x / y[:, None], np.ones_like(y)  # rows scaled by 1/time: minimise the relative error
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    active = [j for j in range(len(FEATURES)) if scale[j] > 0 and x[:, j].any()]
    coef = np.zeros(len(FEATURES))
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] / scale[active], b, rcond=None)
        sol /= scale[active]
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    error = float(np.sqrt(np.mean((x @ coef / y - 1) ** 2)))
    return {f: float(c) for f, c in zip(FEATURES, coef)}, error


# ---- samples: measured on this engine ----------------------------------------------------------

# (concurrent requests, prompt tokens, output tokens): decode-heavy, prefill-heavy and mixed steps, and
# prompts alone of the sizes one request brings (a chunk of 100-700 tokens costs more per token than a
# full one: without them the fit undershoots such requests' first steps by a third)
MEASURE_WORKLOADS = ((1, 64, 48), (4, 512, 32), (16, 128, 48), (32, 64, 32), (8, 1024, 16), (2, 2048, 8),
                     (24, 256, 24), (1, 128, 4), (1, 320, 4), (1, 640, 4), (2, 200, 8))


class _StepRecorder:
    """An engine hook that keeps the features of each step's batch (before its tokens are committed)."""

    def __init__(self):
        self.features: Features | None = None

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        self.features = batch_features(batch)


def measure_engine(engine: LLMEngine, workloads: Sequence[tuple[int, int, int]] = MEASURE_WORKLOADS,
                   seed: int = 0, progress: bool = True) -> list[tuple[Features, float]]:
    """Wall time of each :meth:`LLMEngine.step` (scheduling and bookkeeping included) and its batch's
    features, over ``workloads`` of random prompts run one after another (after one warm-up request)."""
    from tqdm import tqdm

    from infera.sampling_params import SamplingParams

    rng = random.Random(seed)
    recorder = _StepRecorder()
    engine.add_hook(recorder)
    vocab = engine.runner.vocab_size
    samples: list[tuple[Features, float]] = []
    try:
        engine.add_request([rng.randrange(vocab) for _ in range(256)], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        for batch, prompt_len, output_len in tqdm(workloads, desc="measuring steps", disable=not progress):
            params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
            for _ in range(batch):
                engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params)
            while engine.has_unfinished_requests():
                recorder.features = None
                started = time.perf_counter()
                engine.step()
                seconds = time.perf_counter() - started
                if recorder.features is not None:
                    samples.append((recorder.features, seconds))
    finally:
        engine.hooks.remove(recorder)
    return samples


def measure_local(output: str | Path | None = None, progress: bool = True, **engine_kwargs) -> CostModel:
    """Fit a cost model to the bundled model's steps on this machine (``engine_kwargs``: LLMEngine
    options); save it to ``output`` if given."""
    from infera.engine.llm_engine import LLMEngine
    from infera.profiler.hardware import _device_signature

    engine = LLMEngine(**engine_kwargs)
    samples = measure_engine(engine, progress=progress)
    coefficients, error = fit(samples)
    cfg = engine.config
    limits = ReplicaLimits(engine.worker.kv_cache_tokens, cfg.block_size, cfg.max_num_seqs,
                           cfg.max_num_batched_tokens, engine.runner.kv_cache.bytes_per_block // cfg.block_size)
    source = f"measured: {Path(engine.model_path).name} on {_device_signature(engine.device)}"
    model = CostModel(coefficients, limits, source, error, len(samples),
                      {"samples": [[*features, seconds] for features, seconds in samples]})
    if output is not None:
        model.save(output)
    return model


# ---- samples: the roofline of a model on a GPU ---------------------------------------------------

def roofline_samples(config: str, hardware: str, dtype: str = "bfloat16") -> list[tuple[Features, float]]:
    """Roofline-predicted times of decode, prefill-chunk and mixed steps of a built-in model shape."""
    from infera.profiler.hardware import get_hardware
    from infera.profiler.roofline import StepShape, analyze, resolve_model

    shape, layout = resolve_model(None, config, dtype, "none")
    hw = get_hardware(hardware)
    steps: list[tuple[tuple[int, int], ...]] = []  # (cached, new) per sequence
    for batch in (1, 8, 32, 64, 128, 256):
        for context in (512, 4096, 16384):
            steps.append(((context, 1),) * batch)
    for chunk in (256, 1024, 4096, 8192):
        for cached in (0, 8192, 32768):
            steps.append(((cached, chunk),))
            steps.append(((cached, chunk), *((8192, 1),) * 32))
    samples = []
    for queries in steps:
        step = StepShape(tuple((n, c + n) for c, n in queries), len(queries))
        samples.append((step_features(queries), analyze(shape, step, hw, dtype, layout).predicted_s))
    return samples


def roofline_model(config: str = "llama-3-8b", hardware: str = "h100-sxm", memory_gb: float = 80,
                   memory_utilization: float = 0.95, dtype: str = "bfloat16", max_num_seqs: int = 256,
                   max_num_batched_tokens: int = 8192, block_size: int = 16) -> CostModel:
    """A replica serving ``config`` on ``hardware``: step times fitted to its roofline, KV capacity
    what is left of ``memory_utilization`` of ``memory_gb`` after the weights."""
    from infera.profiler.roofline import DTYPE_BYTES, resolve_model

    shape, _ = resolve_model(None, config, dtype, "none")
    weight_bytes = shape.num_parameters * DTYPE_BYTES[dtype]
    kv_bytes_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * DTYPE_BYTES[dtype]
    kv_tokens = int((memory_gb * 1e9 * memory_utilization - weight_bytes) / kv_bytes_per_token)
    if kv_tokens < block_size:
        raise ValueError(f"{config} ({weight_bytes / 1e9:.1f} GB of weights) leaves no KV cache in {memory_gb} GB")
    samples = roofline_samples(config, hardware, dtype)
    coefficients, error = fit(samples)
    limits = ReplicaLimits(kv_tokens // block_size * block_size, block_size, max_num_seqs, max_num_batched_tokens,
                           kv_bytes_per_token)
    source = (f"roofline: {config} {dtype} on {hardware} ({memory_gb:g} GB x {memory_utilization:g}: "
              f"{weight_bytes / 1e9:.1f} GB weights, KV {kv_bytes_per_token // 1024} KiB/token)")
    return CostModel(coefficients, limits, source, error, len(samples))


def load_cost_model(spec: str) -> CostModel:
    """A cost model from a JSON file, or ``roofline:CONFIG@HARDWARE`` (e.g. ``roofline:llama-3-8b@h100-sxm``)."""
    if spec.startswith("roofline:"):
        config, _, hardware = spec.removeprefix("roofline:").partition("@")
        return roofline_model(config or "llama-3-8b", hardware or "h100-sxm")
    return CostModel.load(spec)
