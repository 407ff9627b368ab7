"""Read a GGUF file: the HF config, the tensors under HF names, and the tokenizer."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from infera.loader.errors import ModelLoadError
from infera.loader.generation_config import GGUF_KEYS, gguf_sampling_defaults

# GGUF architecture -> HF architecture and model_type (a "llama" file with experts is a Mixtral)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# Gemma 3: llama.cpp's local RoPE base and sliding-window pattern (the file does not carry them)
GEMMA3_LOCAL_ROPE_THETA, GEMMA3_SLIDING_PATTERN = 10000.0, 6


def gemma3_query_scalar(hidden_size: int, num_heads: int, head_dim: int, num_layers: int) -> float:
    """Gemma 3's query_pre_attn_scalar as llama.cpp derives it (the file does not carry it either):
    the head size, but hidden / heads for the 27B model (62 layers)."""
    return hidden_size / num_heads if num_layers == 62 else head_dim

# GGUF tensor name (per block: blk.N.<name>) -> HF parameter name
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
    # [experts, rows, columns]: one HF tensor per expert
    "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
}
# architectures whose blocks name some tensors otherwise (Gemma: norms after attention and the MLP)
ARCH_BLOCK_TENSORS = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF parameter name of a GGUF tensor, or None if the model has no such parameter."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        part = ARCH_BLOCK_TENSORS.get(arch, {}).get(m.group(2)) or BLOCK_TENSORS.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    stem, _, suffix = gguf_name.rpartition(".")
    part = GLOBAL_TENSORS.get(stem)
    return f"{part}.{suffix}" if part else None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to rotate-half)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class FastGGUFReader(gguf.GGUFReader):
    """gguf-py's reader with the same fields and tensors, parsed about 20x faster: its pieces are
    sliced from a plain array over the memory map (slicing the ``np.memmap`` itself costs microseconds
    a piece), and an array field's elements are read in one loop (Gemma 3's 262k-token vocabulary:
    0.5 s against 9-10 s)."""

    def _plain(self) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self._plain_data = np.asarray(self.data).view(np.ndarray)
        return plain

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        dtype = np.dtype(dtype)
        arr = self._plain()[offset:offset + dtype.itemsize * int(count)].view(dtype)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        item = None
        if raw_type == gguf.GGUFValueType.ARRAY:
            raw_itype, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            item = gguf.GGUFValueType(raw_itype[0])
        if item is None or (item != gguf.GGUFValueType.STRING and item not in self.gguf_scalar_to_np):
            return super()._get_field_parts(orig_offs, raw_type)
        parts, n, offs = [raw_itype, count], int(count[0]), orig_offs + 12
        if item == gguf.GGUFValueType.STRING:  # (length, bytes) per element, as gguf-py lays them out
            for _ in range(n):
                length = self._get(offs, np.uint64)
                parts += [length, self._get(offs + 8, np.uint8, length[0])]
                offs += 8 + int(length[0])
            data = list(range(3, 2 + 2 * n, 2))
        else:  # one part per element
            values = self._get(offs, self.gguf_scalar_to_np[item], n)
            parts += [values[i:i + 1] for i in range(n)]
            offs += values.nbytes
            data = list(range(2, 2 + n))
        return offs - orig_offs, parts, data, [gguf.GGUFValueType.ARRAY] + ([item] if n else [])


@functools.lru_cache(maxsize=4)
def _reader(path: Path, mtime_ns: int, size: int) -> FastGGUFReader:
    """The parsed file (read-only memory map), shared by the engines of one process.  Keyed by the
    file's stat, so a file written again is read again."""
    return FastGGUFReader(path)


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such file")
        stat = self.path.stat()
        try:
            self.reader = _reader(self.path.resolve(), stat.st_mtime_ns, stat.st_size)
        except Exception as e:  # the gguf package raises ValueError/struct/IndexError on bad files
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: unsupported architecture {self.arch!r}; "
                                 f"supported: {', '.join(ARCHITECTURES)}")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> PretrainedConfig:
        architecture, model_type = ARCHITECTURES[self.arch]
        experts = self._field(f"{self.arch}.expert_count")
        if model_type == "llama" and experts:
            architecture, model_type = "MixtralForCausalLM", "mixtral"
        values: dict = {}
        for key, hf_key in GGUF_CONFIG_MAPPING[model_type if model_type in GGUF_CONFIG_MAPPING else self.arch].items():
            value = self._field(f"{self.arch}.{key}")
            if hf_key is not None and value is not None:
                values[hf_key] = value
        if experts:
            values["num_local_experts" if model_type == "mixtral" else "num_experts"] = experts
            values["num_experts_per_tok"] = self._field(f"{self.arch}.expert_used_count")
            size = self._field(f"{self.arch}.expert_feed_forward_length")
            if size:
                values["moe_intermediate_size"] = size
                values.setdefault("intermediate_size", size)
            values["norm_topk_prob"] = True  # llama.cpp renormalizes the top-k weights of both
            dense = [i for i in range(values.get("num_hidden_layers", 0))
                     if f"blk.{i}.ffn_gate_inp.weight" not in self.tensors]
            if dense:  # blocks without a router
                values["mlp_only_layers"] = dense
        if "num_key_value_heads" not in values:
            values["num_key_value_heads"] = values.get("num_attention_heads")
        values.setdefault("vocab_size", len(self._field("tokenizer.ggml.tokens", [])))
        key_length = self._field(f"{self.arch}.attention.key_length")
        if key_length is not None:
            values["head_dim"] = key_length
        rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta", 10000.0)}
        scaling = self._field(f"{self.arch}.rope.scaling.type")
        if scaling and scaling != "none":
            rope.update(rope_type=scaling, factor=self._field(f"{self.arch}.rope.scaling.factor", 1.0))
            original = self._field(f"{self.arch}.rope.scaling.original_context_length")
            if original:
                rope["original_max_position_embeddings"] = original
        if self.arch == "gemma3":
            rope = {"full_attention": rope,
                    "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}}
            values["sliding_window_pattern"] = GEMMA3_SLIDING_PATTERN
            values["query_pre_attn_scalar"] = gemma3_query_scalar(
                values["hidden_size"], values["num_attention_heads"], values["head_dim"], values["num_hidden_layers"])
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                   if k not in values]
        if missing:
            raise ModelLoadError(f"{self.path}: metadata lacks {', '.join(missing)}")
        config = AutoConfig.for_model(
            model_type, architectures=[architecture], rope_parameters=rope,
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self._field("tokenizer.ggml.eos_token_id"), **values)
        return config

    def rope_freq_factors(self) -> torch.Tensor | None:
        t = self.tensors.get("rope_freqs.weight")
        return None if t is None else torch.from_numpy(np.array(t.data, dtype=np.float32))

    def weights(self, config: PretrainedConfig, native: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every tensor the model uses, dequantized; with ``native``,
        quantized 2-D tensors come as :class:`~infera.quant.gguf_blocks.GGUFTensor` (raw blocks)."""
        from infera.quant.gguf_blocks import FLOAT_TYPES, GGUFTensor

        for name, t in self.tensors.items():
            target = hf_name(name, self.arch)
            if target is None:
                continue
            shape = [int(d) for d in reversed(t.shape)]
            # quantized matrices stay raw (an expert stack [experts, rows, columns]: each expert's),
            # except the MoE router: it stays in full precision
            keep = (native and len(shape) > 1 and t.tensor_type.name not in FLOAT_TYPES
                    and not target.endswith("mlp.gate.weight"))
            if keep:  # raw rows: [..., rows, bytes per row]; row permutations apply to them as to values
                w = np.array(t.data).reshape(*shape[:-1], -1)
            else:
                try:
                    w = gguf.quants.dequantize(t.data, t.tensor_type)
                except NotImplementedError:
                    raise ModelLoadError(f"{self.path}: tensor {name} has unsupported type "
                                         f"{t.tensor_type.name}") from None
                w = np.array(w, dtype=np.float32).reshape(shape)
            if self.arch == "gemma3" and target.endswith("norm.weight"):
                w = w - 1  # llama.cpp stores Gemma's 1 + w; HF checkpoints (and GemmaRMSNorm's loader) w
            if self.arch in ("llama", "mistral") and target.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in target else config.num_key_value_heads
                w = _unpermute(w, heads)
            parts = [(target.format(e), w[e]) for e in range(shape[0])] if len(shape) == 3 else [(target, w)]
            for part_name, part in parts:
                if keep:
                    yield part_name, GGUFTensor(np.ascontiguousarray(part), t.tensor_type.name, tuple(shape[-2:]), name)
                else:
                    yield part_name, torch.from_numpy(np.ascontiguousarray(part))

    def generation_config(self) -> dict[str, Any]:
        """Sampling defaults from llama.cpp's ``general.sampling.*`` metadata, if the file has any."""
        return gguf_sampling_defaults({key: self._field(key) for key in GGUF_KEYS})

    def tokenizer_dir(self) -> Path:
        """A directory with the tokenizer converted by transformers (cached: conversion takes seconds)."""
        from transformers import AutoTokenizer

        stat = self.path.stat()
        key = hashlib.sha1(f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = Path(os.environ.get("INFERA_CACHE_DIR", Path.home() / ".cache" / "infera")) / "tokenizers" / key
        if not (cache / "tokenizer_config.json").exists():
            try:
                tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
            except Exception as e:
                raise ModelLoadError(f"{self.path}: cannot build its tokenizer ({e})") from None
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache.parent))
            tok.save_pretrained(tmp)
            try:
                tmp.rename(cache)
            except OSError:  # another process converted it first
                shutil.rmtree(tmp, ignore_errors=True)
        return cache
