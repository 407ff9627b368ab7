"""KV-cache policies: which KV blocks of a long sequence stay in the paged cache.

- ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sink_tokens`` tokens (attention
  sinks) and a recent window stay; the blocks between them are evicted and freed.  Eviction happens
  before each step's new tokens get slots, so a prompt longer than the budget is processed chunk
  by chunk and never holds more than the budget and one chunk.
- ``snapkv`` (SnapKV, Li et al. 2024), block-granular: the whole prompt is prefilled, and the
  attention its last ``OBSERVATION_WINDOW`` tokens pay to every cached position (summed over the
  window's queries, the most of any head and layer, max-pooled over 7 positions) ranks the
  prompt's blocks; the sinks, the blocks of the window and the best-ranked others up to the budget
  stay.
  Every layer and head keeps the same blocks (the block table is the sequence's).  Tokens that
  come later are evicted as ``streaming`` does, oldest first after the sinks and the chosen blocks.

The budget is a token count (a fixed size, as StreamingLLM's cache) or, at most 1, a fraction of
the prompt (kvpress's compression of the prompt; the generated tokens are kept on top).  The sink
tokens round up to whole blocks.  Kept keys keep the rotary positions they were computed at; new
tokens take their true positions.  A budget that covers the whole sequence evicts nothing: the
output is then identical to full KV.

Pure Python over integers: the scheduler calls :meth:`KVPolicy.evict` before a sequence's slots are
allocated; the block manager frees the blocks (:meth:`infera.engine.block_manager.BlockManager.evict`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from infera.engine.block_manager import BlockManager
from infera.engine.sequence import Sequence
from infera.sampling_params import DEFAULT_SINK_TOKENS, check_kv_policy

OBSERVATION_WINDOW = 32  # snapkv: the prompt's last tokens whose attention ranks its blocks
POOL = 7  # snapkv: max-pooling width over positions (SnapKV's kernel size)


@dataclass(frozen=True)
class KVPolicy:
    """An engine's or a request's KV policy (see the module docstring)."""

    name: str = "none"
    budget: float | None = None
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        check_kv_policy(self.name, self.budget, self.sink_tokens)
        if self.name != "none" and self.budget is None:
            raise ValueError(f"kv_policy {self.name} needs a kv_budget (tokens, or a fraction of the prompt)")

    def for_request(self, name: str | None, budget: float | None, sink_tokens: int | None) -> KVPolicy:
        """This (the engine's default) with a request's own settings where it gives them."""
        if name is None and budget is None and sink_tokens is None:
            return self
        name = name or self.name
        return KVPolicy(name, budget if budget is not None else self.budget if name == self.name else None,
                        self.sink_tokens if sink_tokens is None else sink_tokens)

    def budget_tokens(self, seq: Sequence) -> int | None:
        """The tokens of KV ``seq`` may hold now; None: no limit."""
        if self.name == "none":
            return None
        if self.budget <= 1:
            return math.ceil(self.budget * seq.num_prompt_tokens) + seq.num_output_tokens
        return int(self.budget)

    def observation_window(self, seq: Sequence) -> int:
        """Prompt tokens whose attention scores ``seq``'s blocks once its prompt is computed (the
        scheduler keeps them for the prompt's last chunk); 0: none."""
        if self.name != "snapkv" or seq.num_computed_tokens >= seq.num_prompt_tokens:
            return 0
        budget = self.budget_tokens(seq)
        return OBSERVATION_WINDOW if budget < seq.num_prompt_tokens else 0

    def evict(self, seq: Sequence, block_manager: BlockManager) -> int:
        """Evict what ``seq`` holds beyond its budget before its next tokens get slots (never the
        sinks or the block being written); returns the number of blocks freed from its table."""
        drop = self.blocks_to_evict(seq, block_manager.block_size)
        if seq.kv_scores is not None and seq.num_computed_tokens >= seq.num_prompt_tokens:
            seq.kv_scores = None  # (a ranking is for the step after the prompt's)
            seq.kv_pinned = max(0, len(seq.block_table) - len(drop) - self._sinks(block_manager.block_size)
                                - self._recent(seq, block_manager.block_size)) if drop else 0
        block_manager.evict(seq, drop)
        return len(drop)

    def _sinks(self, block_size: int) -> int:
        return -(-self.sink_tokens // block_size)

    def _recent(self, seq: Sequence, block_size: int) -> int:
        """snapkv: the blocks of the observation window (and the one being written)."""
        held = -(-seq.num_kv_tokens // block_size)
        return min(held - self._sinks(block_size), -(-OBSERVATION_WINDOW // block_size) + 1)

    def blocks_to_evict(self, seq: Sequence, block_size: int) -> list[int]:
        """Indices into ``seq``'s block table of the blocks :meth:`evict` drops now."""
        budget = self.budget_tokens(seq)
        if budget is None or (self.name == "snapkv" and seq.num_computed_tokens < seq.num_prompt_tokens):
            return []
        sinks = self._sinks(block_size)
        keep = max(sinks + 1, -(-budget // block_size))
        held = -(-seq.num_kv_tokens // block_size)
        if held <= keep:
            return []
        if seq.kv_scores is not None:
            return self._ranked(seq, block_size, keep, held)
        first = min(sinks + seq.kv_pinned, held - 1 - (held - keep))  # after the chosen blocks, if room
        return list(range(first, first + held - keep))

    def _ranked(self, seq: Sequence, block_size: int, keep: int, held: int) -> list[int]:
        """snapkv: the blocks between the sinks and the observation window's outside the best
        ``keep`` - sinks - window by their pooled attention."""
        sinks, recent = self._sinks(block_size), self._recent(seq, block_size)
        middle = range(sinks, held - recent)
        scores, half = seq.kv_scores, POOL // 2
        pooled = [max(scores[max(0, i - half):i + half + 1]) for i in range(len(scores))]
        block = {b: sum(pooled[b * block_size:(b + 1) * block_size]) for b in middle}
        kept = set(sorted(middle, key=lambda b: -block[b])[:max(0, keep - sinks - recent)])
        return [b for b in middle if b not in kept]
