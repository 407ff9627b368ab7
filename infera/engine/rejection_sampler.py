"""Verification of draft tokens: how many the target model accepts, and the token that follows them.

Both rules keep the target's distribution exactly (greedy: exactly its argmax sequence).

* Deterministic drafts (n-gram, token recycling, greedy draft models; ``q`` one-hot): every row
  is sampled as plain decoding would sample it, and drafts are accepted while they equal the
  samples.  With ``q = one-hot(x)`` this is the rejection rule itself: ``x`` is accepted with
  probability ``p(x) = min(1, p(x)/q(x))`` and otherwise the sample is distributed as
  ``norm(max(0, p - q))``.  A seeded request's generator is rewound to just after the rows whose
  tokens were kept, so it draws exactly the noise plain decoding would: seeded outputs do not
  change when speculation is switched on.
* Drafts sampled from a draft distribution ``q`` (``Sequence.spec_draft_probs``): draft ``x_j`` is
  accepted with probability ``min(1, p_j(x_j) / q_j(x_j))``; the first rejected position samples
  from ``norm(max(0, p_j - q_j))``, and if all are accepted the bonus token comes from ``p_k``
  (Leviathan et al. 2023, Chen et al. 2023).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from infera.engine.sequence import Sequence
from infera.engine.sampler import Sampler, token_logprobs
from infera.layers.sampler import device_tensor, sampling_probs
from infera.outputs import TokenLogprobs

if TYPE_CHECKING:
    from infera.structured.bitmask import BatchBitmask


@dataclass
class Verified:
    """``num_accepted`` drafts were accepted; ``token_id`` follows them; ``logprobs`` are those of the
    accepted drafts and then of ``token_id`` (None where not asked for)."""

    num_accepted: int
    token_id: int
    logprobs: list[TokenLogprobs | None]


class RejectionSampler:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
                 bitmask: BatchBitmask | None = None) -> list[Verified]:
        """``logits`` [sum(1 + len(drafts[i])), V]: the rows of ``seqs[i]`` are the target's next-token
        logits before each of ``drafts[i]`` and after the last.  ``bitmask`` is laid out the same way.
        A sequence without drafts is sampled exactly as :class:`Sampler` samples it."""
        counts = [1 + len(d) for d in drafts]
        starts = list(itertools.accumulate(counts, initial=0))
        row_seqs = [s for s, c in zip(seqs, counts) for _ in range(c)]
        offsets = [j for c in counts for j in range(c)]
        logits, raw_logprobs, states = self.sampler.process(logits, row_seqs, bitmask, offsets)
        with_q = {i for i, s in enumerate(seqs) if drafts[i] and s.spec_draft_probs is not None and not s.params.greedy}
        # deterministic drafts: sample every row like plain decoding; seeded generators are rewound after
        one_hot = [i for i in range(len(seqs)) if i not in with_q]
        rows = [r for i in one_hot for r in range(starts[i], starts[i + 1])]
        rewind = {i: states[starts[i]].generator.get_state() for i in one_hot
                  if drafts[i] and not seqs[i].params.greedy and states[starts[i]].generator is not None}
        sampled = self.sampler.sample(logits[rows], [row_seqs[r] for r in rows], [states[r] for r in rows]) if rows else []
        tokens: dict[int, list[int]] = {}
        pos = 0
        for i in one_hot:
            rows_i = sampled[pos:pos + counts[i]]
            pos += counts[i]
            a = 0
            while a < len(drafts[i]) and rows_i[a] == drafts[i][a]:
                a += 1
            tokens[i] = rows_i[:a + 1]
            if i in rewind:
                self._rewind(states[starts[i]].generator, rewind[i], a + 1, logits.shape[1])
        if with_q:
            q_seqs = sorted(with_q)
            q_rows = [r for i in q_seqs for r in range(starts[i], starts[i + 1])]
            generators = [states[starts[i]].generator for i in q_seqs]
            kept = self._accept_or_resample(logits[q_rows], [seqs[i] for i in q_seqs], [drafts[i] for i in q_seqs],
                                            generators)
            tokens.update(zip(q_seqs, kept))
        out = []
        for i, s in enumerate(seqs):
            kept = tokens[i]
            lps: list[TokenLogprobs | None] = [None] * len(kept)
            for j, t in enumerate(kept):
                states[starts[i]].record(t)
                if raw_logprobs is not None and s.params.logprobs is not None:
                    lps[j] = token_logprobs(raw_logprobs[starts[i] + j], t, s.params.logprobs)
            out.append(Verified(len(kept) - 1, kept[-1], lps))
        return out

    @staticmethod
    def _rewind(generator: torch.Generator, state: torch.Tensor, num_rows: int, width: int) -> None:
        """Put ``generator`` where plain decoding would leave it: ``num_rows`` rows of noise after ``state``."""
        generator.set_state(state)
        scratch = torch.empty(width, device=generator.device)
        for _ in range(num_rows):
            scratch.exponential_(generator=generator)

    def _accept_or_resample(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
                            generators: list[torch.Generator | None]) -> list[list[int]]:
        """The rejection rule for drafts sampled from ``seq.spec_draft_probs`` (q), for all such
        sequences at once (``logits``: their rows, laid out as in :meth:`__call__`); returns each
        one's accepted drafts and the token that follows them.  A seeded request draws its
        acceptance uniforms, then its resampling noise, from its own generator."""
        device = logits.device
        p = sampling_probs(logits, [s.params for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)])
        x = [t for d in drafts for t in (*d, 0)]
        rows = torch.arange(len(x), device=device)
        # q of each draft token (1 after a sequence's last draft: that row is never rejected)
        one = torch.ones((), device=device, dtype=p.dtype)
        q_x = torch.stack([t for s, d in zip(seqs, drafts) for t in (*(q[t] for q, t in zip(s.spec_draft_probs, d)), one)])
        u = torch.cat([torch.rand(len(d) + 1, generator=g or self.sampler.generator, device=device)
                       for d, g in zip(drafts, generators)])
        rejected = (u * q_x.to(p.dtype) > p[rows, device_tensor(x, device)]).tolist()
        firsts, start = [], 0  # each sequence's accepted count and the row it samples the next token from
        for d in drafts:
            a = next((j for j in range(len(d)) if rejected[start + j]), len(d))
            firsts.append((a, start + a))
            start += len(d) + 1
        p_sel = p[device_tensor([r for _, r in firsts], device)]
        # the residual max(0, p - q) at a rejection; p itself after all drafts were accepted
        zero = torch.zeros(p.shape[1], device=device, dtype=p.dtype)
        q_sel = torch.stack([s.spec_draft_probs[a] if a < len(d) else zero for s, d, (a, _) in zip(seqs, drafts, firsts)])
        dist = (p_sel - q_sel.to(p.dtype)).clamp_(min=0)
        empty = dist.sum(dim=-1) <= 0  # p == q at that position: the residual is p itself
        dist = torch.where(empty.unsqueeze(1), p_sel, dist)
        noise = torch.empty_like(dist)
        for j, g in enumerate(generators):
            noise[j].exponential_(generator=g or self.sampler.generator)
        resampled = (dist / noise).argmax(dim=-1).tolist()
        return [d[:a] + [t] for d, (a, _), t in zip(drafts, firsts, resampled)]
