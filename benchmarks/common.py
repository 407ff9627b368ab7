"""Shared pieces of the benchmarks: workloads built from a fixed text, timing, peer loaders."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import infera  # noqa: F401  (before torch: it sets the OpenMP spin count)
import torch


def corpus_text() -> str:
    """English prose shipped with Python: the pydoc topics (no download needed)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_len: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.output_len


def make_workload(tokenizer, name: str, num_requests: int, min_len: int, max_len: int, output_len: int,
                  seed: int = 0) -> Workload:
    """``num_requests`` prompts with lengths uniform in [min_len, max_len], cut from the corpus."""
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_requests):
        n = rng.randint(min_len, max_len)
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start:start + n])
    return Workload(name, prompts, output_len)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def save_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def run_engine(engine, workload: Workload) -> dict[str, float]:
    """Greedy generation of ``workload`` through an infera ``LLMEngine`` (all requests at once):
    total seconds, time to the first sampled tokens (prefill) and the rest (decode)."""
    from infera import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    start = time.perf_counter()
    for p in workload.prompts:
        engine.add_request(p, params)
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"seconds": end - start, "prefill_s": first - start, "decode_s": end - first}


def median_decode_s(single_run: Callable[[], dict[str, float]], repeats: int = 3) -> float:
    """The median decode time of a few single-stream runs (one run of 128 tokens drifts by 20%)."""
    return statistics.median(single_run()["decode_s"] for _ in range(repeats))
