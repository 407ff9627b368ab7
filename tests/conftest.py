"""Shared fixtures: the bundled model, and tiny random-weight HF models built on the fly."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import infera  # noqa: F401  (before torch: sets the OpenMP spin count)
import torch
from infera.kernels import load_cpu_extension, supported_levels
from infera.loader.gguf_file import GGUFFile
from infera.loader.model_loader import default_model_path

TINY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama_256": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),  # rows of k-quant blocks
    "llama3_rope": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        tie_word_embeddings=True,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 256}),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    sliding_window=None, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=64,
                      intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                      intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      mlp_only_layers=[1], tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # local layers see 16 positions (the tests' prompts run past that), with their own RoPE base
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
                   intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # what a gemma3 GGUF file can say: llama.cpp's layer pattern (five local, one global) and query scale
    "gemma3_gguf": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
                        intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=32, query_pre_attn_scalar=32, sliding_window=16, tie_word_embeddings=True,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


@pytest.fixture(params=supported_levels())
def isa(request, monkeypatch) -> str:
    """Each ISA level this CPU runs (infera.kernels), in turn: ``INFERA_CPU_ISA`` is set to it, so
    the native kernels (``load_cpu_extension()``) are that level's. Build what the test runs inside it."""
    monkeypatch.setenv("INFERA_CPU_ISA", request.param)
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler for the native kernels")
    assert load_cpu_extension() is not None, f"the native kernels did not build at ISA level {request.param} (see the log)"
    return request.param


@pytest.fixture
def ext(isa):
    """The native kernel module of each ISA level in turn."""
    return load_cpu_extension()


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(bundled_model_path: Path) -> Path:
    """The bundled model's tokenizer, converted from its GGUF metadata (and cached)."""
    return GGUFFile(bundled_model_path).tokenizer_dir()


def make_tiny_model(root: Path, kind: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight HF model of architecture ``kind`` with the bundled tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / kind
    if (path / "config.json").exists():
        return path
    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                  bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gain = -1.0 if model_type.startswith("gemma") else 0.0  # Gemma's norms scale by 1 + w: the same gains
    with torch.no_grad():  # larger weights than the default init, so logits are not all near zero
        for name, p in model.named_parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2).add_(gain if "norm" in name else 0.0)
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """``tiny_model(kind)`` -> path of a saved tiny HF model (a key of TINY_CONFIGS)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return lambda kind="llama": make_tiny_model(root, kind, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """An fp32 LLM over the tiny Llama, shared by engine tests (they must leave it idle)."""
    from infera import LLM

    return LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB")


def hf_gguf_logits(name: str):
    """``ids -> float32 logits`` of HF transformers loading the cached GGUF of model ``name``
    (a short name of infera.loader.model_store), dequantized to float32."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM

    from infera.loader.gguf_file import FastGGUFReader
    from infera.loader.model_store import cached_path

    path = cached_path(name)
    reader = gguf.GGUFReader
    # transformers parses the file twice (config, then weights), 15-20 s each with gguf-py's reader for
    # a 150k-260k token vocabulary in the metadata: once, with the reader that parses the same fields and
    # tensors faster (test_loader.py checks they are the same)
    gguf.GGUFReader = functools.cache(FastGGUFReader)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    finally:
        gguf.GGUFReader = reader
    return lambda ids: model(torch.tensor([ids])).logits[0].float()


def engine_logits(engine, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits for every position of ``token_ids``, computed in chunks of the given sizes through
    the engine's paged cache (on the CPU, whatever the engine's device)."""
    from infera.engine.sequence import Sequence
    from infera.sampling_params import SamplingParams

    assert sum(chunks) == len(token_ids)
    seq = Sequence(token_ids, SamplingParams())
    bm, runner = engine.block_manager, engine.runner
    out = []
    with torch.inference_mode():
        for n in chunks:
            assert bm.allocate_slots(seq, n)
            [hidden] = runner.hidden_states([seq], [n])
            out.append(runner.model.compute_logits(hidden).float().cpu())
            bm.commit(seq, n)
    bm.free(seq)
    return torch.cat(out)
