"""The one place that builds batch tensors: flat varlen inputs -> model -> logits -> tokens."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from infera.config import DEFAULT_KV_CACHE_MEMORY
from infera.engine.cuda_graph import CUDAGraphRunner
from infera.engine.kv_cache import KVCachePool, available_kv_cache_memory, kv_cache_groups
from infera.engine.pooler import pool
from infera.engine.scheduler import ScheduledBatch
from infera.engine.sequence import Sequence
from infera.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from infera.engine.rejection_sampler import RejectionSampler
from infera.engine.sampler import Sampler, token_logprobs
from infera.layers.sampler import device_tensor, top_tokens
from infera.outputs import TokenLogprobs
from infera.structured.bitmask import BatchBitmask, TokenBitmask

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one scheduled sequence got from a step: its next token (if the step reached its
    end) and the prompt log-probabilities of the positions it computed (if asked for).

    A sequence with draft tokens gets the number of them accepted (``num_accepted``, with their
    log-probabilities) and, in ``token_id``, the token that follows them.  With
    ``ModelRunner.return_top_tokens`` (token recycling) ``top_tokens`` holds the target's most likely
    next token and its probability at each verified position."""

    token_id: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_accepted: int = 0
    accepted_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    embedding: list[float] | None = None  # a pooling sequence whose prompt this step completed


MAX_BATCHED_QUERY_LEN_CPU = 16


class ModelRunner:
    """``kv_cache_memory`` None: 2 GiB on CPU; on CUDA, what ``gpu_memory_utilization`` of the device
    leaves after a warm-up pass of the largest step (``max_num_batched_tokens`` tokens, then
    ``max_num_seqs`` rows sampled). On CUDA, decode steps of up to ``max_num_seqs`` sequences replay
    CUDA graphs unless ``enforce_eager`` (or the cache is hybrid).  A pooling sequence (an embedding
    request) is not sampled: its hidden states are pooled (:func:`infera.engine.pooler.pool`).
    ``hybrid``: a model with sliding-window layers gets a hybrid KV cache (:mod:`infera.engine.kv_cache`)."""

    def __init__(self, model: nn.Module, block_size: int, kv_cache_memory: int | None, eos_token_ids: set[int],
                 device: torch.device, seed: int = 0, kv_cache_dtype: str = "auto", max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 1024, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False, kv_offloading_memory: int = 0,
                 hybrid: bool = False):
        self.model = model
        self.block_size = block_size
        self.device = device
        # queries up to this long run batched with the decodes (the CPU kernel takes any length;
        # on CUDA the decode kernel and its graphs take one token per sequence)
        self.max_batched_query_len = 1 if device.type == "cuda" else MAX_BATCHED_QUERY_LEN_CPU
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        groups = kv_cache_groups(layers, hybrid)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # quantized weights are uint8
        self.vocab_size = model.config.vocab_size
        self.sampler = Sampler(self.vocab_size, device, eos_token_ids, seed)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.return_top_tokens = False
        max_model_len = max_model_len or model.config.max_position_embeddings
        if kv_cache_memory is None and device.type == "cuda":
            # the layers need a cache to run the warm-up: one block, which it does not write
            KVCachePool(groups, block_size, KVCachePool.block_bytes(groups[0], block_size, dtype, kv_cache_dtype),
                        dtype, kv_cache_dtype, device)
            torch.cuda.reset_peak_memory_stats(device)
            self._warm_up(max_num_batched_tokens, max_num_seqs, max_model_len, len(groups) - 1)
            for layer in layers:
                layer.kv_cache = None
            kv_cache_memory = available_kv_cache_memory(device, gpu_memory_utilization)
        self.kv_cache = KVCachePool(groups, block_size, kv_cache_memory or DEFAULT_KV_CACHE_MEMORY, dtype,
                                    kv_cache_dtype, device, kv_offloading_memory, max_num_seqs)
        if self.kv_cache.kivi:  # a short query's blocks are at most two, each staged
            self.max_batched_query_len = min(self.max_batched_query_len, block_size)
        self.num_blocks = self.kv_cache.num_blocks
        self.graphs: CUDAGraphRunner | None = None
        if device.type == "cuda" and not enforce_eager and not self.kv_cache.num_window_groups:
            max_blocks = min(-(-max_model_len // block_size), self.num_blocks)
            self.graphs = CUDAGraphRunner(model, max_num_seqs, max_blocks, model.config.hidden_size, dtype, device)
            self.graphs.capture()

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int, num_rows: int, max_model_len: int, num_window_groups: int) -> None:
        """The largest step: ``num_tokens`` prompt tokens (chunks of at most ``max_model_len``) that
        write no KV (slot -1) in any KV-cache group, logits for ``num_rows`` of them and buffers as large
        as the sampler's."""
        lens = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
        no_table = torch.empty(0, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
                                 prefills=[PrefillChunk(start, n, n, no_table)
                                           for start, n in zip(itertools.accumulate([0] + lens), lens)])
        meta.window_groups = [meta] * num_window_groups
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        with attention_metadata(meta):
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions)
        probs = self.model.compute_logits(hidden[:num_rows]).float().softmax(dim=-1)
        (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, bitmask: TokenBitmask | None = None) -> list[StepOutput]:
        """Run one step; ``bitmask`` constrains the sequences that carry a grammar.  The draft
        tokens of a sequence are computed with it and verified (rejection sampler)."""
        if batch.block_copies:
            self.kv_cache.copy_blocks(batch.block_copies)
        # short queries first: their attention runs batched
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] > self.max_batched_query_len)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        outputs = [StepOutput() for _ in seqs]
        ends = list(itertools.accumulate(counts))  # one past each sequence's last token
        sample_rows = [i for i, (s, n) in enumerate(zip(seqs, counts))
                       if s.num_computed_tokens + n == s.num_tokens + len(s.spec_token_ids) and s.pooling is None]
        sampled = [seqs[i] for i in sample_rows]
        drafts = [s.spec_token_ids for s in sampled]
        speculative = any(drafts)
        # Grammar masks: on a CPU before the forward pass, whose weight reads evict the grammar's
        # data from the caches (the fill took 2-3x longer after it); on a GPU after launching the
        # forward, overlapping its run.
        on_cpu = self.device.type == "cpu"
        mask = self._fill_mask(bitmask, sampled, drafts if speculative else None) if on_cpu else None
        hidden = self.forward(seqs, counts)
        mask = mask if on_cpu else self._fill_mask(bitmask, sampled, drafts if speculative else None)
        if sample_rows:
            # a sequence's rows: the next-token logits before each of its drafts and after the last
            rows = [r for i, d in zip(sample_rows, drafts) for r in range(ends[i] - 1 - len(d), ends[i])]
            logits = self.model.compute_logits(hidden[device_tensor(rows, self.device)])
            if self.return_top_tokens:
                ids, probs = top_tokens(logits, with_probs=True)
                top = list(zip(ids.tolist(), probs.tolist()))
                start = 0
                for i, d in zip(sample_rows, drafts):
                    outputs[i].top_tokens, start = top[start:start + 1 + len(d)], start + 1 + len(d)
            if speculative:
                for i, v in zip(sample_rows, self.rejection_sampler(logits, sampled, drafts, mask)):
                    out = outputs[i]
                    out.token_id, out.logprobs, out.num_accepted = v.token_id, v.logprobs[-1], v.num_accepted
                    out.accepted_logprobs = v.logprobs[:-1]
            else:
                tokens, logprobs = self.sampler(logits, sampled, mask)
                for i, t, lp in zip(sample_rows, tokens, logprobs):
                    outputs[i].token_id, outputs[i].logprobs = t, lp
        start = 0
        for i, (s, n) in enumerate(zip(seqs, counts)):
            if s.params.prompt_logprobs is not None:
                outputs[i].prompt_logprobs = self._prompt_logprobs(s, hidden[start:start + n])
            if s.pooling is not None:
                outputs[i].embedding = pool(s, hidden[start:start + n])
            start += n
        result: list[StepOutput] = [StepOutput()] * len(order)
        for pos, i in enumerate(order):
            result[i] = outputs[pos]
        return result

    @staticmethod
    def _fill_mask(bitmask: TokenBitmask | None, seqs: list[Sequence],
                   drafts: list[list[int]] | None) -> BatchBitmask | None:
        """The grammar masks of the sampled ``seqs`` (None if none carries a grammar)."""
        return bitmask.fill(seqs, drafts) if bitmask is not None else None

    def forward(self, seqs: list[Sequence], counts: list[int], use_graphs: bool = True,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        """Hidden states of the next ``counts[i]`` tokens of each ``seqs[i]`` (short queries first),
        whose K/V go into the cache; the decoder layers in ``skip_layers`` do not run (self-drafting)."""
        input_ids, positions, meta = self.prepare_inputs(seqs, counts)
        if use_graphs and not skip_layers and self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions, skip_layers)
        chunks = iter(meta.prefills)  # (one per long query, in order)
        for seq, n in zip(seqs, counts):
            if n > self.max_batched_query_len and (chunk := next(chunks)).scores is not None:
                seq.kv_scores = chunk.scores.tolist()
        return hidden

    def _forward_any_order(self, seqs: list[Sequence], counts: list[int], use_graphs: bool,
                           skip_layers: frozenset[int] = frozenset()) -> tuple[torch.Tensor, list[int]]:
        """:meth:`forward` of sequences in any order (short queries run first), and the row of the
        hidden states where each sequence's tokens start."""
        order = sorted(range(len(seqs)), key=lambda i: counts[i] > self.max_batched_query_len)
        hidden = self.forward([seqs[i] for i in order], [counts[i] for i in order], use_graphs, skip_layers)
        starts, start = [0] * len(seqs), 0
        for i in order:
            starts[i], start = start, start + counts[i]
        return hidden, starts

    @torch.inference_mode()
    def hidden_states(self, seqs: list[Sequence], counts: list[int]) -> list[torch.Tensor]:
        """The final hidden states [counts[i], hidden size] of the next ``counts[i]`` tokens of each
        ``seqs[i]``, whose K/V go into the cache (a reward head's or an embedding's input); nothing is
        sampled or committed.  Runs eagerly: the tensors are not a CUDA graph's reused buffers."""
        hidden, starts = self._forward_any_order(seqs, counts, use_graphs=False)
        return [hidden[start:start + n] for start, n in zip(starts, counts)]

    @torch.inference_mode()
    def last_logits(self, seqs: list[Sequence], counts: list[int], use_graphs: bool = True,
                    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        """A proposer's forward pass: logits [len(seqs), V] after the next ``counts[i]`` tokens of each
        ``seqs[i]`` (token ids, then draft tokens); nothing is sampled or committed.  ``head`` maps the
        last hidden states to what is returned instead of the model's logits; ``skip_layers``: as
        :meth:`forward`."""
        hidden, starts = self._forward_any_order(seqs, counts, use_graphs, skip_layers)
        rows = [start + n - 1 for start, n in zip(starts, counts)]
        return (head or self.model.compute_logits)(hidden[device_tensor(rows, self.device)])

    def prepare_inputs(self, seqs: list[Sequence], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        for s, n in zip(seqs, counts):
            start = s.num_computed_tokens
            ids = s.token_ids[start:start + n]
            if len(ids) < n:  # draft tokens follow the sequence's own
                first = max(0, start - len(s.token_ids))
                ids += s.spec_token_ids[first:first + n - len(ids)]
            input_ids.extend(ids)
            positions.extend(range(start, start + n))
        # the full-attention group's table starts past an evicted hole, a sliding group's at its window_start
        meta = self._group_metadata(seqs, counts, [s.block_table for s in seqs],
                                    [s.num_computed_tokens - s.num_evicted_tokens for s in seqs], observe=True)
        meta.window_groups = [self._group_metadata(seqs, counts, [s.window_tables[g] for s in seqs],
                                                   [s.num_computed_tokens - s.window_start for s in seqs])
                              for g in range(self.kv_cache.num_window_groups)]
        ids = device_tensor(input_ids, self.device, torch.long)
        pos = device_tensor(positions, self.device, torch.long)
        return ids, pos, meta

    def _group_metadata(self, seqs: list[Sequence], counts: list[int], tables: list[list[int]],
                        kv_starts: list[int], observe: bool = False) -> AttentionMetadata:
        """One KV-cache group's slots and tables: sequence ``i``'s next ``counts[i]`` tokens go to slots
        ``kv_starts[i]`` on of ``tables[i]``; ``observe``: prompt chunks report the attention a KV policy
        ranks blocks by."""
        bs = self.block_size
        staging = self.kv_cache.staging_slots if self.kv_cache.kivi else None
        slots: list[int] = []
        stage_rows: list[int] = []
        decode_stage: list[list[int]] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        decode_starts: list[int] = [0]
        prefills: list[PrefillChunk] = []
        query_start = 0
        for s, n, table, kv_start in zip(seqs, counts, tables, kv_starts):
            slots.extend(table[p // bs] * bs + p % bs for p in range(kv_start, kv_start + n))
            stage: list[int] = []  # kivi2: the staging slots of block 0 and of the residual zone's blocks on
            if staging is not None:
                residual = self.kv_cache.residual_blocks
                zone = max(0, kv_start // bs - residual + 1)
                stage = [staging.get(table[b], -1) if b < len(table) else -1
                         for b in [0, *range(zone, zone + residual + 1)]]
                first = kv_start // bs  # the tokens' staging rows, where their blocks have slots
                written = [staging.get(block_id, -1) for block_id in table[first:(kv_start + n - 1) // bs + 1]]
                stage_rows.extend(written[p // bs - first] * bs + p % bs if written[p // bs - first] >= 0 else -1
                                  for p in range(kv_start, kv_start + n))
            if n <= self.max_batched_query_len:
                decode_tables.append(table)
                decode_lens.append(kv_start + n)
                decode_starts.append(decode_starts[-1] + n)
                decode_stage.append(stage)
            else:
                chunk = PrefillChunk(query_start, n, kv_start + n, device_tensor(table, self.device, torch.long))
                chunk.stage_slots = stage
                if observe and s.kv_observe and s.num_computed_tokens + n >= s.num_prompt_tokens:
                    chunk.observe = min(s.kv_observe, n)  # a KV policy ranks the prompt's blocks
                    chunk.scores = torch.zeros(kv_start + n, dtype=torch.float32, device=self.device)
                prefills.append(chunk)
            query_start += n
        meta = AttentionMetadata(slot_mapping=device_tensor(slots, self.device, torch.long),
                                 num_decode_tokens=decode_starts[-1], prefills=prefills)
        if staging is not None:
            meta.stage_mapping = device_tensor(stage_rows, self.device, torch.long)
            if decode_stage:
                meta.decode_stage_slots = device_tensor(decode_stage, self.device, torch.long)
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = device_tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                                     self.device, torch.long)
            meta.decode_context_lens = device_tensor(decode_lens, self.device, torch.long)
            if decode_starts[-1] > len(decode_lens):
                meta.decode_query_start = device_tensor(decode_starts, self.device, torch.long)
        return meta

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[TokenLogprobs]:
        """Log-probabilities of the prompt tokens that follow the computed positions."""
        start = seq.num_computed_tokens
        n = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)
        if n <= 0:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[:n]).float(), dim=-1)
        targets = seq.token_ids[start + 1:start + 1 + n]
        return [token_logprobs(logprobs[j], targets[j], seq.params.prompt_logprobs) for j in range(n)]
