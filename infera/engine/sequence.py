"""A sequence: token ids, how many of them have KV in the cache, and its block table."""
from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import Any

from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One token stream. Pure Python: the scheduler and block manager only read integers here.

    ``num_computed_tokens`` tokens have their K/V in the cache; the rest are computed in
    later steps (a prompt chunk, or the one token sampled last step).  When
    ``hold_last_token`` is set the sequence stops one token short of its end: the engine
    forks it there so that the ``n`` samples of a request share the prompt's KV blocks.
    ``spec_token_ids`` are draft tokens of speculative decoding: not part of the sequence yet,
    but computed with it (the compute target includes them) and verified by the next step.
    A KV policy (:mod:`infera.engine.kv_policy`) may have evicted ``num_evicted_tokens`` tokens'
    KV (whole blocks) between token ``evicted_from`` (the first evicted) and ``kept_from`` (the
    first of the contiguous kept tail): the block table holds the kept blocks in order, tokens
    before ``evicted_from`` at their own slots and token ``i >= kept_from`` at slot
    ``i - num_evicted_tokens``.  ``kv_observe``/``kv_scores``: a policy's request for the attention
    the prompt's last tokens pay to each cached position, and the model runner's answer.
    """

    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str = "", index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_evicted_tokens = 0
        self.evicted_from = 0
        self.kept_from = 0
        self.kv_observe = 0
        self.kv_scores: list[float] | None = None
        self.kv_pinned = 0  # table entries after the sinks a policy chose to keep (evicted last)
        self.block_table: list[int] = []
        # a hybrid KV cache's sliding-window groups (infera.engine.sliding_window): a table per group from
        # position window_start on, its first window_freed entries released
        self.window_tables: list[list[int]] = []
        self.window_start = 0
        self.window_freed = 0
        self.status = SequenceStatus.WAITING
        self.params = params
        self.hold_last_token = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Opaque per-sequence state owned by other layers (sampler RNG and penalty counts,
        # detokenizer, grammar matcher); copied on fork by their owners.
        self.sampler_state: Any = None
        self.detok_state: Any = None
        self.grammar_state: Any = None
        self.spec_state: Any = None  # owned by infera.spec (proposer index, acceptance history)
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: Any = None  # k draft distributions q ([V] each); None: deterministic drafts
        self.logprobs: list[Any] = []
        self.pooling: PoolingParams | None = None  # an embedding request: its prompt is pooled, nothing sampled
        self.pooling_state: Any = None  # owned by infera.engine.pooler

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose KV is still in the cache."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def compute_target(self) -> int:
        """How many tokens should have KV once the pending work is done."""
        return self.num_tokens - 1 if self.hold_last_token else self.num_tokens + len(self.spec_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.compute_target - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def clear_drafts(self) -> None:
        """Drop the draft tokens: the sequence goes on with plain decoding."""
        self.spec_token_ids = []
        self.spec_draft_probs = None
