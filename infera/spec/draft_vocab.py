"""A draft model's output head cut to part of the vocabulary (as FR-Spec, Zhao et al. 2025).

A small draft model spends a large share of each pass in its output head: Qwen2.5-Coder-0.5B's
Q8_0 head is 145 MB of the 397 MB a decode step reads.  The draft drafts only from the first
``size`` token ids (byte-level BPE vocabularies are ranked by merge order, which follows the
frequency in the tokenizer's training text) plus every token of the drafting sequences' prompts and
the end-of-sequence tokens, so copied identifiers stay draftable.  Speculation stays lossless: the
target verifies every draft, and a token outside the kept set is only never proposed (its draft
probability is 0, which the rejection sampler accounts for).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from infera.layers.linear import float_linear

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence

TILE = 16  # packed weights keep rows in tiles of 16: a kept prefix is a multiple of it


class DraftVocab:
    """Logits of the draft's head over the kept tokens, -inf elsewhere, at the target's width."""

    def __init__(self, lm_head: nn.Module, size: int, target_vocab_size: int, always: list[int]):
        weight = lm_head.weight
        self.packed = getattr(weight, "packed", None)
        self.vocab_size = min(int(weight.shape[0]) if self.packed is None else self.packed.out_features,
                              target_vocab_size)
        self.size = min(size - size % TILE, self.vocab_size - self.vocab_size % TILE)
        if self.size < TILE:
            raise ValueError(f"speculative_draft_vocab_size must be at least {TILE}, got {size}")
        self.weight = weight
        self.prefix = self.packed.head(self.size) if self.packed is not None else None
        self.target_vocab_size = target_vocab_size
        self.always = {t for t in always if self.size <= t < self.vocab_size}
        self._extra_key: frozenset[int] = frozenset()
        self._extra_ids = torch.empty(0, dtype=torch.long)
        self._extra_rows: torch.Tensor | None = None

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(ids, torch.float32)
        return self.weight[ids].float()

    def prepare(self, seqs: list[Sequence]) -> None:
        """Keep the prompt tokens of ``seqs`` (their rows outside the prefix are gathered again only when
        the set of sequences changes)."""
        key = frozenset(s.seq_id for s in seqs)
        if key == self._extra_key:
            return
        self._extra_key = key
        extra = set(self.always)
        for s in seqs:
            extra.update(t for t in s.token_ids[:s.num_prompt_tokens] if self.size <= t < self.vocab_size)
        self._extra_ids = torch.tensor(sorted(extra), dtype=torch.long, device=self.weight.device)
        self._extra_rows = self._rows(self._extra_ids) if extra else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, target vocabulary] logits from the draft's final hidden states."""
        out = hidden.new_full((hidden.shape[0], self.target_vocab_size), float("-inf"), dtype=torch.float32)
        if self.prefix is not None:
            out[:, :self.size] = self.prefix.matmul(hidden)
        else:
            out[:, :self.size] = float_linear(hidden, self.weight[:self.size])
        if self._extra_rows is not None:
            out[:, self._extra_ids] = hidden.float() @ self._extra_rows.T
        return out
