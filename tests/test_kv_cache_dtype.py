"""KV caches smaller than the model's float32: float16 / bfloat16 (half the bytes) and int8 (about a
quarter), logits close to the float cache, the same greedy text, and prefix caching / forks exact
(every reader sees the same stored values, fresh K/V included)."""
from __future__ import annotations

import pytest
import torch

from infera import LLM, SamplingParams
from infera.engine.kv_cache import KVCachePool
from infera.layers.attention import Attention
from conftest import engine_logits
from test_models_vs_hf import PROMPT

PROMPTS = ["The capital of France is", "def add(a, b):", "Water boils at", "List three colors:"]
# bytes per block of a float32 cache over this one's (at least), and bounds on the KL divergence of the
# next-token distributions from the float32 cache's (nats: mean, max). Measured on the bundled model:
# int8 mean 0.0017, max 0.018; float16 mean 7e-7, max 6e-6; bfloat16 mean 7e-5, max 8e-4.
CASES = {"int8": (3.6, 0.01, 0.05), "float16": (2.0, 1e-5, 1e-4), "bfloat16": (2.0, 5e-4, 5e-3)}


def make_llm(path, kv_cache_dtype: str = "auto") -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory="64MiB", kv_cache_dtype=kv_cache_dtype)


@pytest.fixture(scope="module")
def llms() -> dict[tuple[str, str], LLM]:
    """The LLMs built so far, by ISA level and cache dtype (each holds its level's native objects)."""
    return {}


@pytest.fixture(params=list(CASES))
def pair(request, isa, bundled_model_path, llms):
    """(cache dtype, the float32-cache LLM, the LLM with that cache) at each ISA level in turn, each
    LLM built once (tests leave them idle)."""
    for dtype in ("auto", request.param):
        if (isa, dtype) not in llms:
            llms[isa, dtype] = make_llm(bundled_model_path, dtype)
    return request.param, llms[isa, "auto"], llms[isa, request.param]


def test_cache_bytes(pair):
    kv_cache_dtype, flt, small = pair
    ratio = flt.engine.runner.kv_cache.bytes_per_block / small.engine.runner.kv_cache.bytes_per_block
    assert ratio >= CASES[kv_cache_dtype][0]  # int8: 1 byte + a 4-byte scale per 64 values
    assert small.engine.runner.num_blocks >= int(0.9 * ratio * flt.engine.runner.num_blocks)
    assert small.engine.runner.kv_cache.data.dtype == getattr(torch, kv_cache_dtype)


def test_logits_close_to_float(pair):
    kv_cache_dtype, flt, small = pair
    ids = flt.tokenizer.encode(PROMPT)
    chunks = [len(ids) - 8] + [1] * 8
    ref, ours = engine_logits(flt.engine, ids, chunks), engine_logits(small.engine, ids, chunks)
    lp, lq = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    _, mean, most = CASES[kv_cache_dtype]
    assert kl.mean() <= mean and kl.max() <= most, kl
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97


def test_greedy_text_matches_float(pair):
    """Short continuations agree; longer ones can part at near-ties (int8 measured: after 10-16 tokens)."""
    _, flt, small = pair
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in flt.generate(PROMPTS, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in small.generate(PROMPTS, params, use_tqdm=False)]
    assert a == b


def test_prefix_hits_and_forks_exact(pair):
    _, _, small = pair
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = small.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    hits = small.engine.scheduler.prefix_hits
    again = small.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert small.engine.scheduler.prefix_hits > hits and again == first
    forked = small.generate([PROMPT], SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0]
    assert all(o.token_ids == first for o in forked.outputs)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_cuda_refuses_a_16_bit_cache_of_another_dtype():
    """The Triton kernels read the cache in the queries' dtype: a float16 cache under a bfloat16 model
    is a clear error before anything is allocated (no GPU needed to see it)."""
    layers = [Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)]
    with pytest.raises(ValueError, match="needs a float16 model on CUDA"):
        KVCachePool([layers], 16, 2**20, torch.bfloat16, "float16", torch.device("cuda"))
