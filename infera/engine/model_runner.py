"""The one place that builds batch tensors: flat varlen inputs -> model -> logits -> tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from infera.engine.kv_cache import KVCachePool
from infera.engine.scheduler import ScheduledBatch
from infera.engine.sequence import Sequence
from infera.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from infera.layers.sampler import Sampler, TokenLogprobs, token_logprobs
from infera.structured.bitmask import TokenBitmask

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one scheduled sequence got from a step: its next token (if the step reached its
    end) and the prompt log-probabilities of the positions it computed (if asked for)."""

    token_id: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, kv_cache_memory: int, eos_token_ids: set[int],
                 device: torch.device, seed: int = 0, kv_cache_dtype: str = "auto"):
        self.model = model
        self.block_size = block_size
        self.device = device
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # quantized weights are uint8
        self.kv_cache = KVCachePool(layers, block_size, kv_cache_memory, dtype, kv_cache_dtype, device)
        self.num_blocks = self.kv_cache.num_blocks
        self.vocab_size = model.config.vocab_size
        self.sampler = Sampler(self.vocab_size, device, eos_token_ids, seed)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, bitmask: TokenBitmask | None = None) -> list[StepOutput]:
        """Run one step; ``bitmask`` constrains the sequences that carry a grammar."""
        if batch.block_copies:
            self.kv_cache.copy_blocks(batch.block_copies)
        # single-token queries first: their attention runs batched
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] > 1)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta = self.prepare_inputs(seqs, counts)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions)
        outputs = [StepOutput() for _ in seqs]
        ends = torch.tensor(counts).cumsum(0) - 1
        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed_tokens + n == s.num_tokens]
        if sample_rows:
            sampled = [seqs[i] for i in sample_rows]
            # CPU work that overlaps the forward pass where that runs asynchronously (GPU)
            mask = bitmask.fill(sampled) if bitmask is not None else None
            logits = self.model.compute_logits(hidden[ends[sample_rows].to(self.device)])
            tokens, logprobs = self.sampler(logits, sampled, mask)
            for i, t, lp in zip(sample_rows, tokens, logprobs):
                outputs[i].token_id, outputs[i].logprobs = t, lp
        start = 0
        for i, (s, n) in enumerate(zip(seqs, counts)):
            if s.params.prompt_logprobs is not None:
                outputs[i].prompt_logprobs = self._prompt_logprobs(s, hidden[start:start + n])
            start += n
        result: list[StepOutput] = [StepOutput()] * len(order)
        for pos, i in enumerate(order):
            result[i] = outputs[pos]
        return result

    def prepare_inputs(self, seqs: list[Sequence], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for s, n in zip(seqs, counts):
            start = s.num_computed_tokens
            input_ids.extend(s.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefills.append(PrefillChunk(len(input_ids) - n, n, start + n,
                                             torch.tensor(table, dtype=torch.long, device=self.device)))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
                                 num_decode_tokens=len(decode_lens), prefills=prefills)
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                                    dtype=torch.long, device=self.device)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[TokenLogprobs]:
        """Log-probabilities of the prompt tokens that follow the computed positions."""
        start = seq.num_computed_tokens
        n = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)
        if n <= 0:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[:n]).float(), dim=-1)
        targets = seq.token_ids[start + 1:start + 1 + n]
        return [token_logprobs(logprobs[j], targets[j], seq.params.prompt_logprobs) for j in range(n)]
