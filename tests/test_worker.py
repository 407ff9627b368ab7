"""The worker (a model with its runner, KV cache and block manager, from one config), the runner's
hidden-state entry point, and the named points of an engine step where features attach."""
from __future__ import annotations

import pytest
import torch

from infera.config import EngineConfig
from infera.engine.sequence import Sequence
from infera.engine.worker import Worker
from infera.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def worker(tiny_model) -> Worker:
    return Worker(EngineConfig(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="8MiB"))


def test_worker_builds_from_a_config(tiny_model, worker):
    assert worker.hf_config.model_type == "llama" and worker.tokenizer.encode("hello")
    assert worker.block_manager.num_blocks == worker.runner.num_blocks > 0
    assert worker.kv_cache_tokens == worker.runner.num_blocks * worker.config.block_size
    assert worker.max_model_len == min(worker.hf_config.max_position_embeddings, worker.kv_cache_tokens)
    sized = Worker(EngineConfig(model=str(tiny_model("llama")), dtype="float32", block_size=8), kv_cache_tokens=100)
    assert sized.kv_cache_tokens == 104  # 13 blocks of 8


def test_hidden_states_equal_the_models_forward(tiny_model, worker):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (40, 7)]
    seqs = [Sequence(p, SamplingParams()) for p in prompts]
    bm = worker.block_manager
    for seq in seqs:
        assert bm.allocate_slots(seq, len(seq))
    # a prefill and a short query in one batch, the short one second (the runner runs it first)
    hidden = worker.runner.hidden_states(seqs, [len(p) for p in prompts])
    with torch.no_grad():
        for p, h in zip(prompts, hidden):
            ref = hf.model(torch.tensor([p])).last_hidden_state[0]
            assert h.shape == ref.shape
            assert (h - ref).abs().max().item() <= 1e-4
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


class RecordingHook:
    """A feature that records the step points it is called at."""

    def __init__(self):
        self.calls: list[str] = []

    def before_step(self):
        self.calls.append("before_step")

    def admit(self, idle):
        self.calls.append("admit")
        return []

    def after_forward(self, batch, seconds):
        self.calls.append("after_forward")

    def on_token(self, seq, last):
        self.calls.append("on_token")
        return 0

    def after_sampling(self, seq, inputs, draft, out):
        self.calls.append("after_sampling")

    def on_finish(self, seq):
        self.calls.append("on_finish")

    def after_step(self, outputs):
        self.calls.append("after_step")


def test_a_hook_sees_the_named_points_of_each_step(tiny_llm):
    engine = tiny_llm.engine
    hook = RecordingHook()
    engine.add_hook(hook)
    try:
        engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.hooks.remove(hook)
    step = ["before_step", "admit", "after_forward", "on_token", "after_sampling"]
    assert hook.calls == [*step, "after_step", *step, "on_finish", "after_step"]
