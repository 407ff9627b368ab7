"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): routing, quantized experts, bf16, and
lossless batching.  float32 logits against HF transformers are in test_models_vs_hf.py, GGUF
expert stacks in test_loader.py."""
from __future__ import annotations

import pytest
import torch

from infera import LLM
from infera.engine.llm_engine import LLMEngine
from infera.layers.moe import SparseMoeBlock
from infera.loader.gguf_writer import write_gguf
from infera.models.llama import LlamaMLP
from conftest import engine_logits
from test_engine import assert_idle, greedy, prompts, texts
from test_models_vs_hf import PROMPT, chunkings, hf_logits


def test_quantized_gguf_experts_run_natively(tiny_model, bundled_model_path, tmp_path, isa):
    """Q8_0 experts against the dequantized model: int8 (or, from 32 rows on AMX, bf16) activation
    products can flip a near-tied routing choice, moving that position's logits a lot; the others
    stay within 6% of the largest |logit| (measured on a Sapphire Rapids: 1 of 43 positions flips at
    the amx level, none at the others)."""
    path = str(write_gguf(tiny_model("mixtral"), tmp_path / "mixtral-q8.gguf", bundled_model_path, "Q8_0"))
    native = LLMEngine(model=path, dtype="float32", quantization="gguf", kv_cache_memory="32MiB")
    ref = LLMEngine(model=path, dtype="float32", kv_cache_memory="32MiB")  # an explicit dtype dequantizes
    expert = native.runner.model.model.layers[0].mlp.experts[0]
    assert getattr(expert.gate_up_proj.weight, "packed", None) is not None  # raw Q8_0 blocks, not floats
    assert native.weight_bytes < ref.weight_bytes
    ids = ref.tokenizer.encode(PROMPT)
    a, b = engine_logits(native, ids, [len(ids)]), engine_logits(ref, ids, [len(ids)])
    close = (a - b).abs().amax(dim=-1) <= 0.06 * b.abs().max()
    assert close.float().mean().item() >= 0.9, f"{close.float().mean().item():.0%} of positions close"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_int8_quantizes_the_experts_not_the_router(tiny_model):
    path = str(tiny_model("mixtral"))
    int8 = LLMEngine(model=path, dtype="float32", quantization="int8", kv_cache_memory="32MiB")
    ref = LLMEngine(model=path, dtype="float32", kv_cache_memory="32MiB")
    moe = int8.runner.model.model.layers[0].mlp
    assert moe.experts[0].down_proj.weight.element_size() == 1  # int8 values (stored in the native layout)
    assert moe.gate.weight.dtype == torch.float32
    ids = ref.tokenizer.encode(PROMPT)
    a, b = engine_logits(int8, ids, [len(ids)]), engine_logits(ref, ids, [len(ids)])
    # rounding may flip a near-tied routing choice, which moves that position's logits a lot (3 of
    # the 43 positions here)
    close = (a - b).abs().amax(dim=-1) <= 0.05 * b.abs().max()
    assert close.float().mean().item() >= 0.8, f"{close.float().mean().item():.0%} of positions close"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_bf16_matches_hf_but_for_flipped_routing(tiny_model, kind):
    """bfloat16 rounding (which differs between any two implementations) can flip a near-tied
    routing choice at a position, moving its logits a lot: all but a few positions stay within
    the dense models' bound (2% of the largest |logit|)."""
    path = tiny_model(kind)
    engine = LLMEngine(model=str(path), dtype="bfloat16", kv_cache_memory="32MiB")
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(path, ids, torch.bfloat16)
    for name, chunks in chunkings(len(ids)).items():
        close = (engine_logits(engine, ids, chunks) - ref).abs().amax(dim=-1) <= 0.02 * ref.abs().max()
        assert close.float().mean().item() >= 0.9, f"{kind} {name}: {close.float().mean().item():.0%} close"


@pytest.mark.parametrize("tokens", [1, 11])
@pytest.mark.parametrize("normalize", [True, False])
def test_sparse_experts_equal_every_expert_weighted_by_its_routing(normalize, tokens):
    torch.manual_seed(0)
    moe = SparseMoeBlock(16, 6, 2, normalize, expert=lambda: LlamaMLP(16, 24), shared_expert=LlamaMLP(16, 8))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(tokens, 16)
    probs = moe.gate(x).softmax(dim=-1)
    top = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
    if normalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    dense = sum(weights[:, e:e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    dense += torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_batching_chunking_and_prefix_hits_identical(tiny_model, kind):
    """Experts see other rows in a batch (tokens are grouped by expert): outputs stay the same."""
    llm = LLM(str(tiny_model(kind)), dtype="float32", kv_cache_memory="64MiB")
    ps = prompts(12, seed=3)
    batch = texts(llm, ps, greedy())
    assert [texts(llm, [p], greedy())[0] for p in ps[:4]] == batch[:4]  # alone, and prefix hits
    assert llm.engine.scheduler.prefix_hits > 0
    llm.engine.scheduler.max_num_batched_tokens = 16
    llm.engine.reset_prefix_cache()
    assert texts(llm, ps, greedy()) == batch
    assert_idle(llm.engine)
