"""A Llama-family decode step on the CPU in one native call (``csrc/decoder_layer.cpp``).

The C++ stack runs the kernels the modules of :mod:`infera.models.llama` call one by one, in the
same order, so it returns the same tensors bit for bit; it saves the Python between them (on the
bundled 135M model, about a third of a decode step). It takes batches of short queries only
(decode steps, speculative verification); prefill chunks, CUDA, and weights or dtypes the
kernels do not take run the modules. ``INFERA_NATIVE_DECODER=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import nn

from infera.kernels import load_cpu_extension
from infera.layers import paged_attention
from infera.layers.attention import AttentionMetadata
from infera.layers.linear import Linear
from infera.layers.moe import SparseMoeBlock

logger = logging.getLogger(__name__)
ENABLED = os.environ.get("INFERA_NATIVE_DECODER", "1") != "0"


def native_linear(ext: ModuleType, layer: Linear, dtype: torch.dtype):
    """``layer`` as the kernel's Linear, or None if its weights are not ones the kernels take."""
    packed = getattr(layer.weight, "packed", None)
    if packed is not None:
        indptr, indices, values = packed.sparse or (None, None, None)
        return ext.Linear(packed.data, layer.bias, packed.native, packed.out_features, packed.threshold,
                          indptr, indices, values, packed.ic_scale, packed.ic_min, packed.ic_group)
    if layer.quant_method.float_linear_weight and layer.weight.dtype == dtype:
        return ext.Linear(layer.weight, layer.bias)
    return None


def native_moe(ext: ModuleType, moe: SparseMoeBlock, dtype: torch.dtype):
    """``moe`` as the kernel's MoE, or None if some weights are not ones the kernels take."""
    mlps = list(moe.experts) + ([moe.shared_expert] if moe.shared_expert is not None else [])
    linears = [[native_linear(ext, m.gate_up_proj, dtype), native_linear(ext, m.down_proj, dtype)] for m in mlps]
    gates = [moe.gate.weight] + ([moe.shared_expert_gate.weight] if moe.shared_expert is not None else [])
    if any(None in pair for pair in linears) or any(g.dtype != dtype for g in gates):
        return None
    shared = linears.pop() + gates[1:] if moe.shared_expert is not None else []
    return ext.MoE(moe.gate.weight, [g for g, _ in linears], [d for _, d in linears], moe.top_k, moe.normalize,
                   *shared)


def build_stack(ext: ModuleType, model: nn.Module, dtype: torch.dtype, skip_layers: frozenset[int] = frozenset()):
    """The kernel's DecoderStack over ``model.layers`` (a LlamaModel) but ``skip_layers``, or None
    where a layer has weights, norms or a KV cache it does not take."""
    layers = []
    for layer in (layer for i, layer in enumerate(model.layers) if i not in skip_layers):
        attn, mlp = layer.self_attn, layer.mlp
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [attn.q_norm, attn.k_norm] if attn.qk_norm else []
        attention = [native_linear(ext, m, dtype) for m in (attn.qkv_proj, attn.o_proj)]
        if isinstance(mlp, SparseMoeBlock):
            moe, dense = native_moe(ext, mlp, dtype), [None, None]
            mlp_taken = moe is not None
        else:
            moe, dense = None, [native_linear(ext, m, dtype) for m in (mlp.gate_up_proj, mlp.down_proj)]
            mlp_taken = None not in dense
        kv = attn.attn.kv_cache
        if (None in attention or not mlp_taken or kv is None or any(n.weight.dtype != dtype for n in norms)
                or not paged_attention.native_cache(kv, dtype)):
            return None
        q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (None, None)
        layers.append(ext.DecoderLayer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, q_norm, k_norm, *attention, *dense,
            attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale, kv.k, kv.v, kv.k_scale, kv.v_scale,
            moe))
    return ext.DecoderStack(layers, model.rotary.cos, model.rotary.sin, model.norm.eps)


class NativeDecoder:
    """Decode steps of one LlamaModel through the native stack, built on first use for the layers
    and KV cache in place then: one stack per set of skipped layers (none, or a self-drafting
    pass's), kept until the KV cache is replaced."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.kv_id: int | None = None
        self.stacks: dict[frozenset[int], object] = {}

    def _stack(self, hidden: torch.Tensor, skip_layers: frozenset[int]):
        kv_id = id(self.model.layers[0].self_attn.attn.kv_cache)
        if kv_id != self.kv_id:
            self.kv_id, self.stacks = kv_id, {}
        if skip_layers not in self.stacks:
            ext = load_cpu_extension()
            self.stacks[skip_layers] = ext and build_stack(ext, self.model, hidden.dtype, skip_layers)
            logger.info("decode steps%s: %s", " of the draft layers" if skip_layers else "",
                        "one native call for all layers" if self.stacks[skip_layers] else "layer by layer")
        return self.stacks[skip_layers]

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 skip_layers: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last layer's output, residual) of a batch of short queries, or None where the native
        stack does not apply (the caller runs the layers)."""
        if (not ENABLED or meta.prefills or hidden.device.type != "cpu" or hidden.dtype not in
                (torch.float32, torch.bfloat16) or meta.num_decode_tokens != hidden.shape[0]):
            return None
        stack = self._stack(hidden, skip_layers)
        if stack is None:
            return None
        return stack.forward(hidden, positions, meta.slot_mapping, meta.decode_block_tables,
                             meta.decode_context_lens, meta.decode_query_start)
