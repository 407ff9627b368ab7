"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores the experts of each token; the token goes through its ``top_k`` experts (gated
MLPs, quantized like any other linear layer) and their outputs are summed with the router's
probabilities, renormalized over the chosen experts where the model does so (Mixtral, Qwen3-MoE).
Qwen2-MoE adds a shared expert that every token goes through, scaled by a per-token sigmoid gate.
CPU decode steps run the same computation in the native decoder stack (``MoE`` in
``csrc/decoder_layer.cpp``), op for op.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from infera.layers.linear import float_linear


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool,
                 expert: Callable[[], nn.Module], shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router: kept in full precision
        self.experts = nn.ModuleList(expert() for _ in range(num_experts))
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert is not None else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), both [tokens, top_k]."""
        probs = float_linear(x, self.gate.weight).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph cannot follow the routing: every expert runs on every token, weighted 0
            # where not chosen (decode batches, where the graphs are, are small)
            for e, expert in enumerate(self.experts):
                out += expert(x) * (weights * (ids == e)).sum(dim=-1, keepdim=True)
        elif len(x) == 1:  # one token (single-stream decode): its experts in the order below, no sort and
            # no gathering (in the native stack, 4.5 vs 5.4 ms per decode step of benchmarks/moe.py, Q8_0)
            for e, w in sorted(zip(ids[0].tolist(), weights[0])):
                out += self.experts[e](x) * w
        else:  # tokens grouped by expert with one sort; only the chosen experts run
            flat = ids.flatten()
            order = flat.argsort(stable=True)
            tokens, token_weights = order // self.top_k, weights.flatten()[order]
            start = 0
            for e, n in enumerate(torch.bincount(flat, minlength=len(self.experts)).tolist()):
                if n:
                    rows = tokens[start:start + n]
                    out.index_add_(0, rows, self.experts[e](x[rows]) * token_weights[start:start + n, None])
                start += n
        if self.shared_expert is not None:
            out += torch.sigmoid(float_linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out
