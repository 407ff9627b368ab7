"""Continuous batching with chunked prefill mixed into decode steps (SARATHI-style).

Each step spends a token budget: first one token for every running sequence that decodes,
then chunks of prompts already running, then new prompts from the waiting queue.  When KV
blocks run out, the most recently admitted sequence is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed later (its prefix usually comes
back from the prefix cache).  A KV policy (:mod:`infera.engine.kv_policy`) evicts blocks of long
sequences before their next tokens are allocated.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from infera.engine.block_manager import BlockManager
from infera.engine.kv_policy import KVPolicy
from infera.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: compute ``num_new_tokens[i]`` tokens of ``seqs[i]``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, kv_policy: KVPolicy = KVPolicy()):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.reserve = int(watermark * block_manager.num_blocks)
        self.kv_policy = kv_policy  # the default; a request may bring its own settings
        self.num_evicted_blocks = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks were already given to it (a fork)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Decodes first (one token each, plus any draft tokens), then prompts already running, in
        # arrival order.  Draft tokens are all verified in one step or dropped (no budget or blocks).
        queue = deque(sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1 + len(s.spec_token_ids)))
        preempted = False
        while queue and budget > 0:
            seq = queue.popleft()
            if seq.num_uncomputed_tokens > budget:
                seq.clear_drafts()
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                continue
            policy = self._policy(seq)
            self.num_evicted_blocks += policy.evict(seq, self.block_manager)
            n = self._observe(seq, policy, seq.num_computed_tokens, n)
            while not self.block_manager.allocate_slots(seq, n):
                if seq.spec_token_ids:
                    n -= len(seq.spec_token_ids)
                    seq.clear_drafts()
                    continue
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            policy = self._policy(seq)
            window = policy.observation_window(seq)  # its last chunk must hold the window
            hits = self.block_manager.get_computed_blocks(seq, seq.num_prompt_tokens - window if window else None)
            cached = len(hits) * self.block_manager.block_size
            n = self._observe(seq, policy, cached, min(seq.compute_target - cached, budget))
            if not self.block_manager.allocate_slots(seq, n, hits, self.reserve):
                # Take a smaller first chunk if that fits; otherwise wait for blocks.
                bm = self.block_manager
                room = (bm.num_free_blocks - self.reserve - len(hits)) // bm.num_kv_groups * bm.block_size
                n = min(n, room - cached % bm.block_size)
                if n < 1 or not self.block_manager.allocate_slots(seq, n, hits, self.reserve):
                    break
            self.prefix_queries += seq.compute_target
            self.prefix_hits += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        batch.block_copies = self.block_manager.pending_copies
        self.block_manager.pending_copies = []
        return batch

    def _policy(self, seq: Sequence) -> KVPolicy:
        p = seq.params
        return self.kv_policy.for_request(p.kv_policy, p.kv_budget, p.kv_sink_tokens)

    @staticmethod
    def _observe(seq: Sequence, policy: KVPolicy, computed: int, n: int) -> int:
        """The size of ``seq``'s next prompt chunk (``n`` tokens after ``computed``) when its policy
        ranks blocks by the attention of the prompt's last tokens: the last chunk keeps them all,
        and is marked to report that attention (``seq.kv_observe``)."""
        seq.kv_observe = 0
        if window := policy.observation_window(seq):
            remaining = seq.num_prompt_tokens - computed
            if n < remaining and remaining - n < window < remaining:
                n = remaining - window
            if n >= remaining:
                seq.kv_observe = window
        return n

    def _preempt(self, seq: Sequence) -> None:
        logger.info("preempting sequence %d (%d tokens) for lack of KV blocks; it will be recomputed",
                    seq.seq_id, seq.num_tokens)
        self.num_preemptions += 1
        self.running.remove(seq)
        seq.clear_drafts()
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, keep_blocks: bool = False) -> None:
        """Remove a finished or aborted sequence wherever it is (a sequence held back before the
        scheduler saw it is in neither queue) and free its blocks, unless ``keep_blocks``: a retained
        sequence keeps them for later requests to continue from."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
