"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): routing, GGUF expert stacks, quantized
experts, and lossless batching.  Logits against HF transformers are in test_models_vs_hf.py."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from infera import LLM
from infera.engine.llm_engine import LLMEngine
from infera.layers.moe import SparseMoeBlock
from infera.models.llama import LlamaMLP
from conftest import engine_logits
from test_engine import assert_idle, greedy, prompts, texts
from test_models_vs_hf import PROMPT, chunkings, hf_logits

# HF tensor name fragment (after model.layers.N.) -> GGUF name (after blk.N.)
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps",
                "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(hf_dir: Path, path: Path, bundled: Path, expert_type: str = "F32") -> Path:
    """A GGUF file of a saved tiny Mixtral ("llama" with experts) or Qwen3-MoE, laid out as
    llama.cpp converts them (expert stacks, permuted Q/K rows for llama), with the bundled
    model's tokenizer; expert stacks in ``expert_type``."""
    config = AutoConfig.from_pretrained(hf_dir)
    arch = "llama" if config.model_type == "mixtral" else "qwen3moe"
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, value in {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
                       "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
                       "attention.head_count": config.num_attention_heads, "attention.key_length": head_dim,
                       "attention.head_count_kv": config.num_key_value_heads,
                       "expert_count": getattr(config, "num_local_experts", None) or config.num_experts,
                       "expert_used_count": config.num_experts_per_tok}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    if arch == "qwen3moe":
        writer.add_uint32(f"{arch}.expert_feed_forward_length", config.moe_intermediate_size)
    for key, field in gguf.GGUFReader(bundled).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    tensors = load_file(hf_dir / "model.safetensors")
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        w = t.numpy()
        parts = name.split(".")
        if parts[0] == "lm_head":
            writer.add_tensor("output.weight", w)
        elif parts[1] in ("embed_tokens", "norm"):
            writer.add_tensor({"embed_tokens": "token_embd", "norm": "output_norm"}[parts[1]] + ".weight", w)
        elif "experts" in parts:  # model.layers.N.<moe>.experts.E.<proj>.weight
            stacks.setdefault(f"blk.{parts[2]}.{EXPERT_NAMES[parts[6]]}.weight", {})[int(parts[5])] = w
        else:
            if arch == "llama" and parts[-2] in ("q_proj", "k_proj"):  # llama.cpp's interleaved RoPE rows
                heads = config.num_attention_heads if parts[-2] == "q_proj" else config.num_key_value_heads
                w = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
            writer.add_tensor(f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.weight", w)
    qtype = gguf.GGMLQuantizationType[expert_type]
    for name, experts in stacks.items():
        stack = np.stack([experts[e] for e in sorted(experts)])
        writer.add_tensor(name, gguf.quants.quantize(stack, qtype) if expert_type != "F32" else stack,
                          raw_dtype=qtype if expert_type != "F32" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_gguf_expert_stacks_match_hf(tiny_model, bundled_model_path, tmp_path, kind):
    path = write_gguf(tiny_model(kind), tmp_path / f"{kind}.gguf", bundled_model_path)
    engine = LLMEngine(model=str(path), dtype="float32", kv_cache_memory="32MiB")
    assert engine.hf_config.architectures == [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]]
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(tiny_model(kind), ids, torch.float32)
    diff = (engine_logits(engine, ids, [len(ids) - 4, 1, 1, 1, 1]) - ref).abs().max().item()
    assert diff <= 1e-4, f"{kind} from GGUF: max |diff| {diff:.2e}"


def test_quantized_gguf_experts_run_natively(tiny_model, bundled_model_path, tmp_path):
    path = str(write_gguf(tiny_model("mixtral"), tmp_path / "mixtral-q8.gguf", bundled_model_path, "Q8_0"))
    native = LLMEngine(model=path, dtype="float32", quantization="gguf", kv_cache_memory="32MiB")
    ref = LLMEngine(model=path, dtype="float32", kv_cache_memory="32MiB")  # an explicit dtype dequantizes
    expert = native.runner.model.model.layers[0].mlp.experts[0]
    assert getattr(expert.gate_up_proj.weight, "packed", None) is not None  # raw Q8_0 blocks, not floats
    assert native.weight_bytes < ref.weight_bytes
    ids = ref.tokenizer.encode(PROMPT)
    a, b = engine_logits(native, ids, [len(ids)]), engine_logits(ref, ids, [len(ids)])
    assert (a - b).abs().max().item() <= 0.06 * b.abs().max().item()
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


@pytest.mark.parametrize("normalize", [True, False])
def test_sparse_experts_equal_every_expert_weighted_by_its_routing(normalize):
    torch.manual_seed(0)
    moe = SparseMoeBlock(16, 6, 2, normalize, expert=lambda: LlamaMLP(16, 24), shared_expert=LlamaMLP(16, 8))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(11, 16)
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
