"""The token bitmask of a batch: filled on the CPU for the constrained rows only, applied to
the logits right before sampling.  Rows of unconstrained sequences are neither filled nor
touched, so they pay nothing."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import xgrammar as xgr

from infera.kernels import cpu_kernels

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean vector [V] -> xgrammar's int32 bitset [ceil(V / 32)] (bit j of word w is token 32w + j)."""
    words = -(-allowed.numel() // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The inverse of ``pack_bits`` for one row or a batch of rows: bool [..., vocab_size]."""
    bits = (bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


# byte value -> the additive mask of its 8 tokens (0 where the bit is set, -inf where not)
_BYTE_BITS = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
_BYTE_MASK = torch.zeros(256, 8).masked_fill_(_BYTE_BITS == 0, float("-inf"))
_BYTE_MASK_NP = _BYTE_MASK.numpy()


@dataclass
class BatchBitmask:
    """Filled masks for ``rows`` of a batch of logits [R, V]."""

    bitmask: torch.Tensor  # int32 [>= R, ceil(V / 32)] on the CPU
    rows: list[int]
    vocab_size: int
    scratch: np.ndarray  # float32 [>= len(rows), 32 * ceil(V / 32)]: the additive masks (CPU)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (float32 logits).

        On CPU the native kernel skips all-allowed words and writes -inf with masked vector
        stores. Without it, each bitmask byte looks up its 8 additive entries (0 or -inf), then
        one numpy add per masked row, without allocations."""
        n, vocab = len(self.rows), self.vocab_size
        if ext := cpu_kernels(logits):
            ext.apply_token_bitmask(logits, self.bitmask, self.rows, vocab)
        elif logits.device.type == "cpu":
            packed = self.bitmask.numpy()[self.rows].view(np.uint8)
            additive = self.scratch[:n]
            np.take(_BYTE_MASK_NP, packed, axis=0, out=additive.reshape(packed.shape + (8,)))
            out = logits.numpy()
            for j, row in enumerate(self.rows):  # in place, no temporaries
                np.add(out[row, :vocab], additive[j, :vocab], out=out[row, :vocab])
        else:
            packed = self.bitmask[self.rows].view(torch.uint8).to(logits.device, torch.long)
            additive = torch.nn.functional.embedding(packed, _BYTE_MASK.to(logits.device)).view(n, -1)[:, :vocab]
            index = torch.tensor(self.rows, device=logits.device)
            logits[index, :vocab] += additive


class TokenBitmask:
    """A reusable bitmask buffer for the engine's batches."""

    def __init__(self, vocab_size: int, stop_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.buffer = xgr.allocate_token_bitmask(16, vocab_size)
        self.scratch = np.empty((16, self.buffer.shape[1] * 32), dtype=np.float32)
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[[t for t in stop_token_ids if t < vocab_size]] = True
        self.stop_only = pack_bits(allowed)  # the row of a sequence whose grammar failed to compile
        self.batch_matcher = xgr.BatchGrammarMatcher("auto")  # fills rows on several threads
        self.num_rows = 0  # sequences sampled in the current step

    def fill(self, seqs: list[Sequence], drafts: list[list[int]] | None = None) -> BatchBitmask | None:
        """Masks for the rows of ``seqs`` that carry a grammar; None if no row needs one.

        With ``drafts`` (speculative decoding), sequence ``i`` has ``1 + len(drafts[i])`` consecutive
        rows: the mask before each of its draft tokens and after the last (the drafts are ones its
        grammar accepts)."""
        self.num_rows = len(seqs)
        counts = [1 + len(d) for d in drafts] if drafts is not None else [1] * len(seqs)
        starts = list(itertools.accumulate(counts, initial=0))
        constrained = [i for i, s in enumerate(seqs) if s.grammar_state is not None]
        if not constrained:
            return None
        if self.buffer.shape[0] < starts[-1]:
            self.buffer = xgr.allocate_token_bitmask(max(starts[-1], 2 * self.buffer.shape[0]), self.vocab_size)
            self.scratch = np.empty((self.buffer.shape[0], self.buffer.shape[1] * 32), dtype=np.float32)
        matchers, live = [], []
        for i in constrained:
            matcher = seqs[i].grammar_state.matcher
            if matcher is None:
                self.buffer[starts[i]:starts[i + 1]] = self.stop_only
            elif counts[i] == 1:
                matchers.append(matcher)
                live.append(starts[i])
            else:  # walk the drafts, then go back
                for j, t in enumerate(drafts[i]):
                    matcher.fill_next_token_bitmask(self.buffer, starts[i] + j)
                    matcher.accept_token(t)
                matcher.fill_next_token_bitmask(self.buffer, starts[i + 1] - 1)
                matcher.rollback(counts[i] - 1)
        if len(matchers) == 1:  # one row: the matcher itself, not the batch filler and its threads
            matchers[0].fill_next_token_bitmask(self.buffer, live[0])
        elif matchers:
            self.batch_matcher.batch_fill_next_token_bitmask(matchers, self.buffer, live)
        rows = [r for i in constrained for r in range(starts[i], starts[i + 1])]
        return BatchBitmask(self.buffer, rows, self.vocab_size, self.scratch)
