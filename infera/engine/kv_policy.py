"""KV-cache policies: which KV blocks of a long sequence stay in the paged cache.

``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sink_tokens`` tokens (attention sinks)
and a recent window stay; the blocks between them are evicted and freed, so a sequence holds about
``budget`` tokens of KV however long it grows.  The budget is a token count (a fixed window, as
StreamingLLM's cache size) or, at most 1, a fraction of the prompt (kvpress's compression of the
prompt; the generated tokens are added on top).  Eviction is by whole blocks, before the blocks of a
step's new tokens are allocated (also between the chunks of a long prompt, so a prompt longer than
the budget never holds more than the budget and one chunk); the sink tokens round up to whole
blocks.  Kept keys keep the rotary positions they were computed at; new tokens take their true
positions.  A budget that covers the whole sequence evicts nothing: the output is then identical to
full KV.

Pure Python over integers: the scheduler calls :meth:`KVPolicy.blocks_to_evict` and the block
manager frees them (:meth:`infera.engine.block_manager.BlockManager.evict`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from infera.engine.sequence import Sequence
from infera.sampling_params import DEFAULT_SINK_TOKENS, check_kv_policy


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

    def blocks_to_evict(self, seq: Sequence, block_size: int) -> tuple[int, int]:
        """``(first, count)``: the blocks of ``seq``'s table to evict before its next tokens are
        computed (count 0: none): the oldest blocks after the sinks beyond the budget, never the
        block being written."""
        budget = self.budget_tokens(seq)
        if budget is None:
            return 0, 0
        sinks = -(-self.sink_tokens // block_size)
        keep = max(sinks + 1, -(-budget // block_size))
        held = -(-seq.num_kv_tokens // block_size)
        return sinks, max(0, held - keep)
