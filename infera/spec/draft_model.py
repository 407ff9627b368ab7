"""A smaller model with the same tokenizer drafts for the target (``speculative="draft:PATH"``).

The draft has its own worker: model runner, KV pool and block manager.  Each target sequence has a shadow
sequence in the draft's cache: before drafting, the shadow is brought in step with the target's
tokens (its KV is kept for the common prefix, i.e. up to the last accepted draft, and rolled back
beyond), then all drafting sequences run ``k`` batched draft passes: the first computes the tokens
the draft has not seen yet (the whole prompt for a new sequence), the others one draft token each.
Greedy requests get the draft's argmax; sampled requests get a sample of the draft's distribution
``q`` (same temperature / top-k / top-p), which the rejection sampler needs.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from infera.spec.controller import LinearCost
from infera.spec.draft_vocab import DraftVocab
from infera.spec.proposer import Draft, Proposer, choose_draft_tokens, seeded_generator

if TYPE_CHECKING:
    from infera.engine.sequence import Sequence
    from infera.engine.worker import Worker

CATCH_UP_CHUNK = 512  # longest prompt chunk the draft computes in one pass


@dataclass
class Shadow:
    """A target sequence's copy in the draft's cache; ``num_synced`` tokens are known to equal the target's."""

    seq: Sequence
    num_synced: int
    generator: torch.Generator | None


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, draft: Worker, target_vocab_size: int, seed: int, draft_vocab_size: int = 0):
        self.runner = draft.runner
        self.block_manager = draft.block_manager
        self.vocab_size = target_vocab_size
        self.device = draft.device
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.shadows: dict[int, tuple[weakref.ref[Sequence], Shadow]] = {}
        self.draft_cost = LinearCost(prior_ratio=0.15)
        self.vocab = (DraftVocab(draft.runner.model.lm_head, draft_vocab_size, target_vocab_size,
                                 draft.tokenizer.eos_token_ids) if 0 < draft_vocab_size < draft.runner.vocab_size
                      else None)
        self.head = self.vocab.logits if self.vocab else lambda hidden: self._target_width(
            self.runner.model.compute_logits(hidden))

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in seqs]
        active = [i for i, k in enumerate(num_tokens) if k > 0 and self._prepare(seqs[i], num_tokens[i], seqs)]
        if not active:
            return drafts
        shadows = {i: self.shadows[seqs[i].seq_id][1] for i in active}
        while True:  # long catch-ups (new sequences) in chunks first
            behind = [i for i in active if shadows[i].seq.num_uncomputed_tokens > CATCH_UP_CHUNK]
            if not behind:
                break
            self.runner.last_logits([shadows[i].seq for i in behind], [CATCH_UP_CHUNK] * len(behind),
                                    head=lambda hidden: hidden)  # no logits: only the K/V matter
            for i in behind:
                self.block_manager.commit(shadows[i].seq, CATCH_UP_CHUNK)
        if self.vocab:  # every shadowed sequence's prompt: the set changes as sequences come and go, not per step
            self.vocab.prepare([seq for ref, _ in self.shadows.values() if (seq := ref()) is not None])
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        for j in range(max(num_tokens[i] for i in active)):
            step = [i for i in active if num_tokens[i] > j]
            started = time.perf_counter()
            shadow_seqs = [shadows[i].seq for i in step]
            counts = [s.num_uncomputed_tokens for s in shadow_seqs]
            logits = self.runner.last_logits(shadow_seqs, counts, head=self.head)
            tokens, q = choose_draft_tokens(logits, [seqs[i] for i in step], [shadows[i].generator for i in step],
                                            self.generator)
            for i, s, n, t, q_i in zip(step, shadow_seqs, counts, tokens, q):
                self.block_manager.commit(s, n)
                s.append_token(t)
                drafts[i].token_ids.append(t)
                if q_i is not None:
                    probs[i].append(q_i)
            if j:  # the first pass also catches up on the target's new tokens
                self.draft_cost.add(len(step), time.perf_counter() - started)
        for i in active:
            drafts[i].probs = probs[i] or None
        return drafts

    def _prepare(self, seq: Sequence, k: int, batch: list[Sequence]) -> bool:
        """Sync the shadow of ``seq`` and give it slots for ``k`` draft passes; False if the draft's
        cache has no room even after dropping the shadows of sequences outside ``batch``."""
        entry = self.shadows.get(seq.seq_id)
        if entry is None:
            shadow = Shadow(type(seq)(seq.token_ids, seq.params), len(seq.token_ids), seeded_generator(seq, self.device))
            self.shadows[seq.seq_id] = (weakref.ref(seq), shadow)
        else:
            shadow = entry[1]
            self._sync(shadow, seq.token_ids)
        need = shadow.seq.num_uncomputed_tokens + k - 1
        if self.block_manager.allocate_slots(shadow.seq, need):
            return True
        keep = {s.seq_id for s in batch}
        for seq_id in [i for i in self.shadows if i not in keep]:
            self.block_manager.free(self.shadows.pop(seq_id)[1].seq)
        return self.block_manager.allocate_slots(shadow.seq, need)

    def _sync(self, shadow: Shadow, tokens: list[int]) -> None:
        """Keep the shadow's tokens (and KV) for the prefix it shares with ``tokens``, then take the rest."""
        own = shadow.seq.token_ids
        m = shadow.num_synced
        while m < len(own) and m < len(tokens) and own[m] == tokens[m]:
            m += 1
        del own[m:]
        # the last token is computed again even where its KV is kept: the first draft pass needs its logits
        # (the target may not have moved since the last drafts, when the scheduler dropped them)
        self.block_manager.truncate(shadow.seq, min(shadow.seq.num_computed_tokens, m, len(tokens) - 1))
        own.extend(tokens[m:])
        shadow.num_synced = len(tokens)

    def _target_width(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (padded vocabularies may differ in size)."""
        v = logits.shape[1]
        if v >= self.vocab_size:
            return logits[:, :self.vocab_size]
        return torch.nn.functional.pad(logits, (0, self.vocab_size - v), value=float("-inf"))

    def release_finished(self) -> None:
        for seq_id, (ref, shadow) in list(self.shadows.items()):
            seq = ref()
            if seq is None or seq.is_finished:
                self.block_manager.free(shadow.seq)
                del self.shadows[seq_id]
