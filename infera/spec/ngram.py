"""Prompt lookup (n-gram) drafting: find the sequence's last ``n`` tokens earlier in its prompt or
output and propose what followed them there.  Pays off where the output copies its input
(rewriting, summarizing, editing code) and costs nothing when no match is found."""
from __future__ import annotations

from typing import TYPE_CHECKING

from infera.spec.proposer import Draft, Proposer

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence


class NgramIndex:
    """For each ``n`` in ``[min_n, max_n]``: n-gram -> position right after its latest occurrence
    that has a continuation.  Extended with the tokens appended since the last lookup (O(new tokens))."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.num_indexed = 0

    def update(self, tokens: list[int]) -> None:
        for p in range(max(self.num_indexed, 1), len(tokens)):
            for n in self.sizes:
                if p >= n:
                    self.tables[n][tuple(tokens[p - n:p])] = p
        self.num_indexed = len(tokens)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier match of the sequence's suffix."""
        self.update(tokens)
        for n in self.sizes:
            if len(tokens) > n:
                p = self.tables[n].get(tuple(tokens[-n:]))
                if p is not None:
                    return tokens[p:p + k]
        return []


class NgramProposer(Proposer):
    """Matches of ``max_n`` down to ``min_n`` tokens.  Single-token matches (``min_n=1``) draft more
    often and guess worse; on CPU the kernels compute up to four rows for the price of one, so the
    extra guesses are nearly free (measured: 7% fewer steps than ``min_n=2`` on rewriting tasks)."""

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 5):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            state = seq.spec_state
            if state.proposer is None:
                state.proposer = NgramIndex(self.min_n, self.max_n)
            drafts.append(Draft(state.proposer.lookup(seq.token_ids, k)))
        return drafts
