"""Pooling a sequence's final hidden states (after the model's last norm) into one embedding, chunk by
chunk as its prompt is computed: the prompt may come in several chunked-prefill steps, and a
preempted sequence computes its prompt again from the start."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infera.engine.sequence import Sequence


@dataclass
class MeanPoolState:
    """The float32 sum of the hidden states of positions [0, num_pooled)."""

    total: torch.Tensor
    num_pooled: int = 0


def pool(seq: Sequence, hidden: torch.Tensor) -> list[float] | None:
    """Take ``hidden`` (the rows of ``seq``'s positions from ``seq.num_computed_tokens`` on) into its
    embedding; the embedding once the rows reach the prompt's end, else None."""
    params = seq.pooling
    start = seq.num_computed_tokens
    end = start + hidden.shape[0]
    if params.pooling_type == "MEAN":
        state = seq.pooling_state
        if state is None:
            state = seq.pooling_state = MeanPoolState(torch.zeros(hidden.shape[-1], dtype=torch.float32,
                                                                  device=hidden.device))
        if start > state.num_pooled:
            raise RuntimeError(f"mean pooling missed positions {state.num_pooled}..{start - 1} (a prefix-cache hit)")
        skip = state.num_pooled - start  # recomputed after a preemption: pooled already
        if skip < hidden.shape[0]:
            state.total += hidden[skip:].float().sum(dim=0)
            state.num_pooled = end
    if end < seq.num_prompt_tokens:
        return None
    vector = hidden[-1].float() if params.pooling_type == "LAST" else seq.pooling_state.total / seq.num_prompt_tokens
    if params.normalize:
        vector = F.normalize(vector, dim=-1)
    return vector.cpu().tolist()
