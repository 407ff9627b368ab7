"""Write an HF-directory model of the Llama family (dense or mixture of experts) or Gemma 3 as a GGUF file,
laid out as llama.cpp's converter lays it out, so that llama.cpp and infera can run the very
same weights: the inverse of :class:`~infera.loader.gguf_file.GGUFFile`.

Q/K rows are permuted for llama's interleaved RoPE, each layer's expert matrices are stacked into
one [experts, rows, columns] tensor, and the metadata goes under the GGUF architecture's keys.
The tokenizer metadata is copied from another GGUF file with the same tokenizer (the bundled
model's, for the random-weight models of the tests and benchmarks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from infera.loader.gguf_file import (ARCH_BLOCK_TENSORS, BLOCK_TENSORS, GEMMA3_LOCAL_ROPE_THETA,
                                     GEMMA3_SLIDING_PATTERN, GLOBAL_TENSORS, gemma3_query_scalar)
from infera.loader.safetensors_dir import SafetensorsDir
from infera.models.llama import head_dim_of
from infera.models.registry import model_class

# HF model_type -> GGUF architecture
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}
_GLOBAL_NAMES = {hf: gguf for gguf, hf in GLOBAL_TENSORS.items()}


def _gemma3_metadata(config: PretrainedConfig) -> dict[str, int | float]:
    """What a gemma3 file carries beyond the Llama keys; a config that differs from what llama.cpp
    assumes of the rest (local RoPE base, sliding pattern, query scale) is refused."""
    head_dim = head_dim_of(config)
    pattern = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
               for i in range(config.num_hidden_layers)]
    if (config.layer_types != pattern or config.rope_parameters["sliding_attention"] != {
            "rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}
            or config.query_pre_attn_scalar != gemma3_query_scalar(config.hidden_size, config.num_attention_heads,
                                                                   head_dim, config.num_hidden_layers)):
        raise ValueError("a gemma3 GGUF file assumes llama.cpp's layer pattern, local RoPE base and query scale")
    return {"attention.sliding_window": config.sliding_window}


def _metadata(config: PretrainedConfig) -> dict[str, int | float]:
    values = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
              "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
              "attention.head_count": config.num_attention_heads,
              "attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
              "attention.key_length": head_dim_of(config), "attention.value_length": head_dim_of(config),
              "rope.dimension_count": head_dim_of(config),
              "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
              # (Gemma 3: the global layers' base)
              "rope.freq_base": float(config.rope_parameters.get("full_attention",
                                                                 config.rope_parameters)["rope_theta"])}
    if config.model_type == "gemma3_text":
        values |= _gemma3_metadata(config)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        values.update(expert_count=experts, expert_used_count=config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            values["expert_feed_forward_length"] = config.moe_intermediate_size
    return values


def gguf_name(name: str, arch: str = "llama") -> tuple[str, int | None]:
    """(GGUF tensor name, expert index or None) of an HF parameter name (after the model's renames)."""
    block_names = {hf: gguf for gguf, hf in (BLOCK_TENSORS | ARCH_BLOCK_TENSORS.get(arch, {})).items()}
    parts = name.split(".")
    stem, suffix = ".".join(parts[:-1]), parts[-1]
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}", None
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"no GGUF name for tensor {name}")
    block, inner = parts[2], ".".join(parts[3:-1])
    if ".experts." in f".{inner}.":  # mlp.experts.E.<proj>
        head, expert, proj = inner.rsplit(".", 2)
        inner, index = f"{head}.{{}}.{proj}", int(expert)
    else:
        index = None
    if inner not in block_names:
        raise ValueError(f"no GGUF name for tensor {name}")
    return f"blk.{block}.{block_names[inner]}.{suffix}", index


def write_gguf(model_dir: str | Path, path: str | Path, tokenizer_from: str | Path, tensor_type: str = "F32",
               tensor_types: dict[str, str] | None = None) -> Path:
    """Write the model in ``model_dir`` to ``path``; matrices in ``tensor_type`` (F32, F16, BF16 or a
    block quant such as Q8_0, Q4_0 or Q4_K), or in ``tensor_types[fragment]`` for those whose GGUF
    name contains ``fragment`` (as llama.cpp's Q4_K_M mixes Q4_K and Q6_K); norms and MoE routers in F32."""
    import gguf

    from infera.quant.gguf_blocks import quantize_blocks

    source = SafetensorsDir(model_dir)
    config = source.config()
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"{model_dir}: cannot write model type {config.model_type!r} as GGUF")
    arch = GGUF_ARCHITECTURES[config.model_type]
    renames = getattr(model_class(config.architectures[0]), "checkpoint_renames", {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in _metadata(config).items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    for key, field in gguf.GGUFReader(tokenizer_from).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    tensors: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in source.weights():
        for fragment, ours in renames.items():
            name = name.replace(f".{fragment}.", f".{ours}.")
        target, expert = gguf_name(name, arch)
        w = tensor.to(torch.float32).numpy()
        if arch == "gemma3" and target.endswith("norm.weight"):
            w = w + 1  # llama.cpp stores Gemma's 1 + w
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):  # interleaved RoPE pairs
            heads = config.num_attention_heads if "attn_q" in target else config.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if expert is None:
            tensors[target] = w
        else:
            stacks.setdefault(target, {})[expert] = w
    tensors |= {name: np.stack([experts[e] for e in sorted(experts)]) for name, experts in stacks.items()}
    for name, w in tensors.items():
        type_name = next((t for fragment, t in (tensor_types or {}).items() if fragment in name), tensor_type)
        if w.ndim == 1 or name.endswith("ffn_gate_inp.weight") or type_name == "F32":
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, quantize_blocks(torch.from_numpy(w), type_name),
                              raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
