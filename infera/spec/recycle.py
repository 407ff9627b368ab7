"""Token Recycling (Luo et al. 2024): the target's own predictions from earlier steps, kept in an
adjacency table ``token -> most likely next token`` and walked as a draft chain.

Every step computes the target's next-token distribution at each verified position anyway; its
most likely token is recycled into the row of the position's input token.  The table is shared by
all sequences and requests (what the model predicted after a token is a good guess the next time
that token comes up), needs no extra model and takes 8 bytes per vocabulary entry (384 KiB for a
49k vocabulary).  Drafts are chains, because the paged-attention kernels verify one chain per
sequence, not trees; a chain stops where the product of the recorded probabilities falls below
``min_confidence``.
"""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from infera.spec.proposer import Draft, Proposer

if TYPE_CHECKING:
    from infera.engine.model_runner import StepOutput
    from infera.engine.sequence import Sequence


class RecycleProposer(Proposer):
    name = "recycle"
    wants_top_tokens = True

    def __init__(self, vocab_size: int, min_confidence: float = 0.1):
        self.next_token = array("i", [-1]) * vocab_size  # -1: nothing recorded yet
        self.next_prob = array("f", [0.0]) * vocab_size
        self.min_confidence = min_confidence

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            tokens: list[int] = []
            t, confidence = seq.token_ids[-1], 1.0
            while len(tokens) < k:
                confidence *= self.next_prob[t]
                t = self.next_token[t]
                if t < 0 or confidence < self.min_confidence:
                    break
                tokens.append(t)
            drafts.append(Draft(tokens))
        return drafts

    def observe(self, seq: Sequence, inputs: list[int], out: StepOutput) -> None:
        for t, (guess, prob) in zip(inputs, out.top_tokens):
            self.next_token[t] = guess
            self.next_prob[t] = prob
