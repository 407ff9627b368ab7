"""Gemma 3, text only (Gemma3ForCausalLM; GGUF architecture ``gemma3``).

Against the Llama family: embeddings scaled by sqrt(hidden size); RMSNorms of ``x * (1 + w)``
(:class:`~infera.layers.layernorm.GemmaRMSNorm`), four per layer (before and after attention and
the MLP); query and key heads normalized; attention scaled by ``query_pre_attn_scalar ** -0.5``;
a GELU (tanh) gate; and local layers (``layer_types``: five of six in the released models) whose
queries see only the last ``sliding_window`` positions, with their own RoPE base. Optional final
logit soft-capping. Every layer keeps its whole context in the paged cache (a sliding layer reads
only its window of it).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from infera.layers.activation import GeluAndMul
from infera.layers.embed_head import VocabEmbedding
from infera.layers.layernorm import GemmaRMSNorm
from infera.layers.rotary_embedding import RotaryEmbedding
from infera.models.llama import (LlamaAttention, LlamaForCausalLM, LlamaMLP, add_and_norm, head_dim_of,
                                 run_layers)

SLIDING = "sliding_attention"


class Gemma3Attention(LlamaAttention):
    norm = GemmaRMSNorm


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int):
        super().__init__()
        self.self_attn = Gemma3Attention(config, rotary, sliding_window)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, act=GeluAndMul())
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output before the residual add, the residual stream), as Llama's layers."""
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config: PretrainedConfig, max_position: int, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention (an embedding model's) is not supported")
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # in the weights' dtype, as HF transformers rounds it
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        head_dim = head_dim_of(config)
        rotary = {t: RotaryEmbedding(config, head_dim, max_position, rope_freq_factors, t)
                  for t in sorted(set(config.layer_types))}
        self.rotary = nn.ModuleDict(rotary)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, rotary[t], config.sliding_window if t == SLIDING else 0)
            for t in config.layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        return run_layers(self, positions, self.embed_tokens(input_ids) * self.embed_scale, skip_layers)


class Gemma3ForCausalLM(LlamaForCausalLM):
    base_model = Gemma3Model
    sliding_window_attention = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap
