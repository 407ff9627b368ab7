"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3, and the mixtures of
experts Mixtral, Qwen2-MoE, Qwen3-MoE) over paged attention.

The variants differ by configuration only: Qwen2 adds a bias to the QKV projection, Qwen3
normalizes each query and key head before RoPE, the MoE models replace the MLP of their sparse
layers with a :class:`~infera.layers.moe.SparseMoeBlock`.  Mixtral checkpoints name their
tensors differently (``MixtralForCausalLM.checkpoint_renames``).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from infera.layers.activation import SiluAndMul
from infera.layers.attention import Attention, get_attention_metadata
from infera.layers.embed_head import LMHead, VocabEmbedding
from infera.layers.layernorm import RMSNorm
from infera.layers.linear import Linear, MergedLinear
from infera.layers.moe import SparseMoeBlock
from infera.layers.rotary_embedding import RotaryEmbedding
from infera.models.llama_native import NativeDecoder


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    norm = RMSNorm  # of the query and key heads (Qwen3, Gemma 3)

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int = 0):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", config.model_type == "qwen2")
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe", "gemma3_text")
        if self.qk_norm:
            self.q_norm = self.norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, scale, sliding_window)
        self.sizes = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: nn.Module | None = None):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


def mlp_of(config: PretrainedConfig, layer: int) -> nn.Module:
    """Layer ``layer``'s MLP: dense, or a mixture of experts (Mixtral: every layer; Qwen-MoE: the
    layers ``decoder_sparse_step`` and ``mlp_only_layers`` make sparse)."""
    hidden = config.hidden_size
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    sparse = (num_experts > 0 and layer not in (getattr(config, "mlp_only_layers", None) or [])
              and (layer + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0)
    if not sparse:
        return LlamaMLP(hidden, config.intermediate_size, getattr(config, "mlp_bias", False))
    size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0)
    return SparseMoeBlock(hidden, num_experts, config.num_experts_per_tok, getattr(config, "norm_topk_prob", True),
                          expert=lambda: LlamaMLP(hidden, size),
                          shared_expert=LlamaMLP(hidden, shared) if shared else None)


def add_and_norm(norm: RMSNorm, hidden: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``norm`` of the residual stream with ``hidden`` added, that stream); the first layer starts it."""
    return (norm(hidden), hidden) if residual is None else norm(hidden, residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = mlp_of(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def run_layers(model: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
               skip_layers: frozenset[int]) -> torch.Tensor:
    """``model.layers`` but ``skip_layers`` one by one, then the final norm ``model.norm``."""
    residual = None
    for i, layer in enumerate(model.layers):
        if i not in skip_layers:
            hidden, residual = layer(positions, hidden, residual)
    return model.norm(hidden, residual)[0]


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_position: int, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_position, rope_freq_factors)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.native_decoder = NativeDecoder(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final hidden states; the layers in ``skip_layers`` do not run (a self-drafting pass)."""
        hidden = self.embed_tokens(input_ids)
        if (out := self.native_decoder(hidden, positions, get_attention_metadata(), skip_layers)) is not None:
            return self.norm(*out)[0]
        return run_layers(self, positions, hidden, skip_layers)


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard index)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    base_model = LlamaModel
    sliding_window_attention = False  # whether the config's sliding windows run (else the engine stays inside one)

    def __init__(self, config: PretrainedConfig, max_position: int, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = self.base_model(config, max_position, rope_freq_factors)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        return self.model(input_ids, positions, skip_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MixtralForCausalLM(LlamaForCausalLM):
    # checkpoint name fragment -> this model's (applied before packed_modules_mapping)
    checkpoint_renames = {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
