"""The proposer interface: draft tokens for running sequences, to be verified by the target model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from infera.layers.sampler import apply_logit_bias, sampling_probs

if TYPE_CHECKING:
    from infera.engine.model_runner import StepOutput
    from infera.engine.sequence import Sequence
    from infera.spec.controller import LinearCost


@dataclass
class Draft:
    """Tokens proposed to follow a sequence; ``probs`` holds the distribution ([V]) each was sampled
    from, or is None for deterministic drafts (q one-hot)."""

    token_ids: list[int]
    probs: list[torch.Tensor] | None = None


class Proposer:
    """Drafts up to ``num_tokens[i]`` tokens for each of ``seqs``; may propose fewer, or none.

    ``draft_cost`` fits the time of one draft pass against the sequences in it (None: drafting is
    free, as lookups are).  Per-sequence state lives in ``seq.spec_state.proposer``."""

    name = ""
    draft_cost: LinearCost | None = None
    wants_top_tokens = False  # the steps should return ``StepOutput.top_tokens``

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Draft]:
        raise NotImplementedError

    def observe(self, seq: Sequence, inputs: list[int], out: StepOutput) -> None:
        """After a step of ``seq``: ``inputs`` are its verified tokens at the positions whose next-token
        predictions ``out`` holds (the token before the drafts, then the accepted drafts)."""

    def release_finished(self) -> None:
        """Free what finished sequences still hold (a draft model's KV blocks)."""


def choose_draft_tokens(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None],
                        default_generator: torch.Generator) -> tuple[list[int], list[torch.Tensor | None]]:
    """A draft model's next tokens: its argmax for greedy requests; for sampled ones a sample of its
    distribution q (the request's logit bias, temperature, top-k, top-p, min-p), returned for verification."""
    logits = apply_logit_bias(logits, [seq.params for seq in seqs])  # drafts the target will accept
    tokens = logits.argmax(dim=-1).tolist()
    probs: list[torch.Tensor | None] = [None] * len(seqs)
    rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if rows:  # one pass over all sampled rows: small per-row tensor ops cost more than the math
        q = sampling_probs(logits[rows].float(), [seqs[i].params for i in rows])
        noise = torch.empty_like(q)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=generators[i] or default_generator)
        for j, (i, t) in enumerate(zip(rows, (q / noise).argmax(dim=-1).tolist())):
            tokens[i], probs[i] = t, q[j]
    return tokens, probs


def seeded_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """The draft-side generator of a seeded request (independent of its sampling generator)."""
    if seq.params.seed is None:
        return None
    return torch.Generator(device).manual_seed((seq.params.seed + seq.index + 0x5EED) % 2**64)
