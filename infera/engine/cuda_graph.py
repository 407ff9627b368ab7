"""Decode steps replayed from CUDA graphs.

A pure-decode step launches the same few hundred small kernels every time, only on different data,
so their launch cost, not the GPU, bounds small batches. The forward pass is captured once per
batch-size bucket (1, 2, 4, 8, then every 16 up to ``max_num_seqs``; largest first, all graphs in
one memory pool) and a step replays the smallest bucket that holds its batch, after copying its
inputs into static buffers. Padded rows get slot -1 (the KV write skips them) and context length 0
(attention reads nothing for them); their outputs are ignored. Nothing in the captured pass may
depend on host data: the decode kernel's context split depends on the batch size only.
Prefill and mixed steps run eagerly; ``enforce_eager`` turns graphs off.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from infera.layers.attention import AttentionMetadata, attention_metadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... below ``max_batch``, then ``max_batch`` itself."""
    return [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]


class CUDAGraphRunner:
    """The model's decode forward pass (``input_ids``, ``positions`` -> hidden states) as graphs:
    :meth:`capture` them once, then :meth:`run` steps. :meth:`prepare` and :meth:`forward` are
    what a replay does, runnable eagerly (the tests check the padding on CPU with them)."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.long, device=device)
        self.hidden = torch.zeros(max_batch, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def forward(self, batch: int) -> torch.Tensor:
        """The model on the first ``batch`` rows of the static buffers."""
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:batch], num_decode_tokens=batch,
                                 decode_block_tables=self.block_tables[:batch],
                                 decode_context_lens=self.context_lens[:batch])
        with attention_metadata(meta):
            return self.model(self.input_ids[:batch], self.positions[:batch])

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, the largest first (the smaller ones fit in its memory), one pool.
        The buffers hold padding (slot -1, context 0) then: capturing writes no KV."""
        started = time.monotonic()
        pool = None
        for batch in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            self.forward(batch)  # warm-up: compiles the kernels for this shape outside the capture
            with torch.cuda.graph(graph, pool):
                self.hidden[:batch] = self.forward(batch)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs of the decode step for %d batch sizes up to %d in %.1fs",
                    len(self.buckets), self.buckets[-1], time.monotonic() - started)

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Whether the step is pure decode and fits the largest graph."""
        return not meta.prefills and 0 < meta.num_decode_tokens <= self.buckets[-1]

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy a pure-decode step into the static buffers, padded to the smallest bucket that holds
        it (slot -1, context 0); returns the bucket."""
        n = input_ids.shape[0]
        batch = next(b for b in self.buckets if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:batch] = -1
        self.context_lens[:n] = meta.decode_context_lens
        self.context_lens[n:batch] = 0
        tables = meta.decode_block_tables
        self.block_tables[:n, :tables.shape[1]] = tables
        return batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of a pure-decode step ([n, hidden]; valid until the next replay)."""
        self.graphs[self.prepare(input_ids, positions, meta)].replay()
        return self.hidden[:input_ids.shape[0]]
