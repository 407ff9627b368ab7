"""The engine on a CUDA GPU (Triton attention, CUDA graphs, sync-free sampling, KV sizing from
free memory): logits against HF transformers on the same GPU, greedy output identical across
batching and with or without CUDA graphs. Skipped without CUDA.

Run on a GPU: ``python -m pytest -q tests/test_cuda.py tests/test_triton_kernels.py``.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from infera import LLM, SamplingParams
from infera.engine.llm_engine import LLMEngine
from infera.layers import paged_attention
from conftest import engine_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks, " * 2
WORDS = "the engine schedules every sequence in blocks while a cache keeps keys and values for later tokens".split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]




def hf_logits(path, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    with torch.inference_mode():
        return model(torch.tensor([token_ids], device="cuda")).logits[0].float().cpu()


def chunkings(n: int) -> dict[str, list[int]]:
    return {"prefill": [n], "chunked": [7, 16, n - 23], "prefill+decode": [n - 6] + [1] * 6}


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mixtral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prefill", paged_attention.PREFILL_BACKENDS)
def test_logits_match_hf(tiny_model, kind, dtype, prefill, monkeypatch):
    """float32: max |diff| <= 2e-4; bfloat16: <= 2% of the largest |logit| (as on CPU)."""
    monkeypatch.setattr(paged_attention, "PREFILL_BACKEND", prefill)
    path = tiny_model(kind)
    engine = LLMEngine(model=str(path), dtype=dtype, device="cuda", kv_cache_memory="32MiB", enforce_eager=True)
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(path, ids, getattr(torch, dtype))
    tol = 2e-4 if dtype == "float32" else 0.02 * ref.abs().max().item()
    for name, chunks in chunkings(len(ids)).items():
        diff = (engine_logits(engine, ids, chunks) - ref).abs().max().item()
        assert diff <= tol, f"{kind} {dtype} {name}: max |diff| {diff:.2e}"


def test_int8_kv_cache_close_to_float(tiny_model):
    """The Triton int8 paths (quantized store, dequantizing reads) within the CPU test's bounds."""
    path = str(tiny_model("llama"))
    engines = [LLMEngine(model=path, dtype="float32", device="cuda", kv_cache_memory="32MiB", kv_cache_dtype=kv,
                         enforce_eager=True) for kv in ("auto", "int8")]
    ids = engines[0].tokenizer.encode(PROMPT)
    chunks = [len(ids) - 8] + [1] * 8
    lp, lq = (engine_logits(e, ids, chunks).log_softmax(-1) for e in engines)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert kl.mean() <= 0.01 and kl.max() <= 0.05, kl
    assert (lp.argmax(-1) == lq.argmax(-1)).float().mean() >= 0.97


@pytest.fixture(scope="module")
def llms(tiny_model) -> dict[str, LLM]:
    path = str(tiny_model("llama"))
    return {mode: LLM(path, dtype="float32", device="cuda", kv_cache_memory="64MiB", max_num_seqs=24,
                      enforce_eager=mode == "eager") for mode in ("eager", "graphs")}


def test_greedy_identical_across_batching_and_graphs(llms):
    ps = prompts(20)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for mode, llm in llms.items():
        assert (llm.engine.runner.graphs is None) == (mode == "eager")
        results[mode, "batch"] = [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]
        results[mode, "alone"] = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in ps[:6]]
    reference = results["eager", "alone"]
    for key, out in results.items():
        assert out[:6] == reference, key
    assert results["graphs", "batch"] == results["eager", "batch"]


def test_mixture_of_experts_graphs_match_eager(tiny_model):
    """Under a CUDA graph every expert runs on the batch (zero weights where not chosen); eager
    steps run the chosen experts only: the same tokens."""
    path = str(tiny_model("mixtral"))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = LLM(path, dtype="float32", device="cuda", kv_cache_memory="64MiB", enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts(8, seed=2), params, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_seeded_sampling_reproducible_with_graphs(llms):
    llm = llms["graphs"]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=16, ignore_eos=True) for i in range(4)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts(4), params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts(4), params, use_tqdm=False)]
    alone = llm.generate(prompts(4)[2], params[2], use_tqdm=False)[0].outputs[0].token_ids
    assert first == again and alone == first[2]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decode_step_syncs_once(llms, temperature):
    """A decode step waits for the GPU only to bring the sampled tokens back."""
    engine = llms["graphs"].engine
    for p in prompts(5):
        engine.add_request(p, SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True))
    for _ in range(3):  # prefill, then decode steps
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    while engine.has_unfinished_requests():
        engine.step()


def test_kv_cache_sized_from_free_memory(tiny_model):
    path = str(tiny_model("qwen3"))
    total = torch.cuda.get_device_properties(0).total_memory
    engine = LLMEngine(model=path, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3,
                       max_num_seqs=8, enforce_eager=True)
    pool = engine.runner.kv_cache.num_bytes
    assert 0 < pool <= 0.3 * total
    assert torch.cuda.memory_reserved() <= 0.3 * total
    del engine
    torch.cuda.empty_cache()
