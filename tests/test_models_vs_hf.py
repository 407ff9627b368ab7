"""Every model path against HF transformers logits on the same weights.

Tolerances: float32 max |diff| <= 1e-4 on tiny models (5e-4 on the 30-layer bundled model,
whose logits reach ~30 in magnitude); bfloat16 max |diff| <= 2% of the largest |logit|
(both sides round activations to bf16 at different points, so only a coarse bound holds).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from infera.engine.llm_engine import LLMEngine
from conftest import engine_logits

PROMPT = "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks, " * 2




def hf_logits(path, token_ids: list[int], dtype: torch.dtype, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def chunkings(n: int) -> dict[str, list[int]]:
    return {
        "prefill": [n],
        "chunked": [7, 16, n - 23],
        "short chunks": [n - 12, 4, 3, 5],
        "prefill+decode": [n - 6] + [1] * 6,
    }


@pytest.mark.parametrize("kind", ["llama", "llama3_rope", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "gemma3"])
def test_tiny_fp32_matches_hf(tiny_model, kind):
    path = tiny_model(kind)
    engine = LLMEngine(model=str(path), dtype="float32", kv_cache_memory="32MiB")
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(path, ids, torch.float32)
    for name, chunks in chunkings(len(ids)).items():
        ours = engine_logits(engine, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{kind} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])  # mixtures of experts: test_moe.py
def test_tiny_bf16_matches_hf(tiny_model, kind):
    path = tiny_model(kind)
    engine = LLMEngine(model=str(path), dtype="bfloat16", kv_cache_memory="32MiB")
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(path, ids, torch.bfloat16)
    for name, chunks in chunkings(len(ids)).items():
        ours = engine_logits(engine, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= 0.02 * ref.abs().max().item(), f"{kind} {name}: max |diff| {diff:.3f}"


@pytest.mark.slow
def test_bundled_gguf_matches_hf(bundled_model_path):
    engine = LLMEngine(model=str(bundled_model_path), dtype="float32", kv_cache_memory="256MiB")
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(bundled_model_path.parent, ids, torch.float32, gguf_file=bundled_model_path.name)
    for name, chunks in chunkings(len(ids)).items():
        ours = engine_logits(engine, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= 5e-4, f"bundled {name}: max |diff| {diff:.2e}"
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
