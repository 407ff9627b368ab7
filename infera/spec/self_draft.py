"""Training-free self-drafting: the target model drafts for itself with some of its layers skipped
(``speculative="self"`` or ``"self:LAYERS"``, e.g. ``self:8-20,24``; the default skips every other
layer of the second half, where layers change the residual stream least).

The draft passes run on the target's own weights and KV cache: each writes the K/V of the layers
it runs into the sequence's slots beyond its verified length, which the verification pass then
overwrites with the full model's, so no second cache is needed.  Verified positions are never
written, so the draft reads the full model's K/V for them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from infera.spec.controller import LinearCost
from infera.spec.proposer import Draft, Proposer, choose_draft_tokens, seeded_generator

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence
    from infera.engine.worker import Worker


def parse_layers(spec: str, num_layers: int) -> set[int]:
    """``"8-20,24"`` -> {8, ..., 20, 24}; empty: every other layer of the second half (the last
    layer for models too shallow for that)."""
    if not spec:
        if num_layers < 2:
            raise ValueError("speculative: self-drafting skips layers, so it needs a model of at least 2 layers")
        return set(range(num_layers // 2 + 1, num_layers - 1, 2)) or {num_layers - 1}
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"speculative: cannot parse the layers to skip {spec!r} (e.g. self:8-20,24)") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers or len(layers) == num_layers:
        raise ValueError(f"speculative: layers to skip must be some, not all, of 0-{num_layers - 1}; got {spec!r}")
    return layers


@dataclass
class DraftPass:
    """What the model runner reads of a sequence for one draft pass: its tokens and block tables, the
    drafts so far, and where this pass starts."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    num_evicted_tokens: int
    window_tables: list[list[int]]
    window_start: int
    spec_token_ids: list[int] = field(default_factory=list)
    kv_observe: int = 0


class SelfDraftProposer(Proposer):
    name = "self"

    def __init__(self, target: Worker, skip: str = ""):
        self.target = target
        self.runner = target.runner
        self.block_manager = target.block_manager
        self.skip = frozenset(parse_layers(skip, len(target.runner.model.model.layers)))
        self.draft_cost = LinearCost(prior_ratio=0.15)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in seqs]
        passes: dict[int, DraftPass] = {}
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            if k == 0:
                continue
            self.block_manager.truncate(seq, seq.num_computed_tokens)  # slots of drafts never verified
            if self.block_manager.allocate_slots(seq, seq.num_uncomputed_tokens + k - 1):
                passes[i] = DraftPass(seq.token_ids, seq.block_table, seq.num_computed_tokens, seq.num_evicted_tokens,
                                      seq.window_tables, seq.window_start)
        self.target.copy_pending_blocks()  # the draft reads the blocks split copy-on-write
        generators = {i: self._generator(seqs[i]) for i in passes}
        probs: dict[int, list] = {i: [] for i in passes}
        for j in range(max((num_tokens[i] for i in passes), default=0)):
            step = [i for i in passes if num_tokens[i] > j]
            started = time.perf_counter()
            views = [passes[i] for i in step]
            counts = [len(v.token_ids) + len(v.spec_token_ids) - v.num_computed_tokens for v in views]
            logits = self.runner.last_logits(views, counts, skip_layers=self.skip)
            tokens, q = choose_draft_tokens(logits, [seqs[i] for i in step], [generators[i] for i in step],
                                            self.runner.sampler.generator)
            for i, v, n, t, q_i in zip(step, views, counts, tokens, q):
                v.num_computed_tokens += n
                v.spec_token_ids.append(t)
                if q_i is not None:
                    probs[i].append(q_i)
            if j:
                self.draft_cost.add(len(step), time.perf_counter() - started)
        for i, v in passes.items():
            drafts[i] = Draft(v.spec_token_ids, probs[i] or None)
        return drafts

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """The draft-side generator of a seeded request, kept for the sequence's lifetime."""
        state = seq.spec_state
        if state.proposer is None:
            state.proposer = [seeded_generator(seq, self.runner.device)]
        return state.proposer[0]
