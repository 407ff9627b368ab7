"""Logits -> next tokens for a batch of sequences: penalties, logit biases, grammar masks, min_tokens,
per-request seeds, logprobs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infera.engine.sequence import Sequence
from infera.layers.sampler import apply_logit_bias, device_tensor, sampling_probs, top_tokens
from infera.outputs import TokenLogprobs

if TYPE_CHECKING:
    from infera.structured.bitmask import BatchBitmask


class SamplerState:
    """Per-sequence sampling state: its RNG (seeded requests) and penalty bookkeeping."""

    def __init__(self, seq: Sequence, vocab_size: int, device: torch.device):
        params = seq.params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device).manual_seed((params.seed + seq.index) % 2**64)
        self.output_counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.needs_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt = torch.tensor(seq.token_ids[:seq.num_prompt_tokens], dtype=torch.long, device=device)
            self.seen[prompt.clamp_(0, vocab_size - 1)] = True
            for t in seq.output_token_ids:  # a sequence resumed after its state was dropped
                self.record(t)

    def record(self, token_id: int) -> None:
        if self.output_counts is not None and token_id < self.output_counts.numel():
            self.output_counts[token_id] += 1
            self.seen[token_id] = True

    def fork(self) -> SamplerState:
        """An independent copy whose RNG is seeded from this one's, so a fork stays reproducible."""
        child = SamplerState.__new__(SamplerState)
        child.generator = None
        if self.generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
            child.generator = torch.Generator(self.generator.device).manual_seed(seed)
        child.output_counts = None if self.output_counts is None else self.output_counts.clone()
        child.seen = None if self.seen is None else self.seen.clone()
        return child


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: set[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)

    def state(self, seq: Sequence) -> SamplerState:
        if seq.sampler_state is None:
            seq.sampler_state = SamplerState(seq, self.vocab_size, self.device)
        return seq.sampler_state

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 bitmask: BatchBitmask | None = None) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample one token per row of ``logits`` [R, V] (float32) for ``seqs``.

        ``bitmask`` holds the allowed tokens of the rows under a grammar (structured output):
        other tokens get probability zero.  Log-probabilities are those of the model, before
        any processing.
        """
        logits, raw_logprobs, states = self.process(logits, seqs, bitmask)
        tokens = self.sample(logits, seqs, states)
        for state, token in zip(states, tokens):
            state.record(token)
        out: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, s in enumerate(seqs):
                if s.params.logprobs is not None:
                    out[i] = token_logprobs(raw_logprobs[i], tokens[i], s.params.logprobs)
        return tokens, out

    def process(self, logits: torch.Tensor, seqs: list[Sequence], bitmask: BatchBitmask | None = None,
                offsets: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[SamplerState]]:
        """Logits ready to sample from (penalties, logit bias, grammar mask, min_tokens), the model's
        log-probabilities (if a row wants them) and the rows' states.  Row ``i`` chooses output token
        ``num_output_tokens + offsets[i]`` of ``seqs[i]`` (several rows of a sequence verify its drafts)."""
        logits = logits.float()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        states = [self.state(s) for s in seqs]
        logits = self._apply_penalties(logits, seqs, states)
        logits = apply_logit_bias(logits, [s.params for s in seqs])  # before the mask: the grammar wins
        if bitmask is not None:
            bitmask.apply(logits)
        return self._suppress_eos(logits, seqs, offsets), raw_logprobs, states

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], states: list[SamplerState]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p, st = seqs[i].params, states[i]
            row = logits[i]
            if p.repetition_penalty != 1.0:
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(st.seen, penalized, row))
            if p.frequency_penalty or p.presence_penalty:
                counts = st.output_counts.to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _suppress_eos(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int] | None) -> torch.Tensor:
        offsets = offsets or [0] * len(seqs)
        rows = [(i, s) for i, (s, o) in enumerate(zip(seqs, offsets)) if s.num_output_tokens + o < s.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i, s in rows:
            ids = device_tensor(self.eos_token_ids + s.params.stop_token_ids, logits.device)
            row = logits[i].index_fill(0, ids, float("-inf"))
            # a complete grammar allows only its end: then the grammar wins over min_tokens
            if s.grammar_state is None or bool(row.isfinite().any()):
                logits[i] = row
        return logits

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], states: list[SamplerState]) -> list[int]:
        """Nothing here waits for the device until the tokens come back (``tolist``)."""
        tokens = top_tokens(logits)[0]
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            idx = device_tensor(random_rows, logits.device)
            probs = sampling_probs(logits[idx], [seqs[i].params for i in random_rows])
            noise = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(random_rows) if states[i].generator is None]
            if unseeded:
                noise[device_tensor(unseeded, probs.device)] = torch.empty(
                    len(unseeded), probs.shape[1], device=probs.device).exponential_(generator=self.generator)
            for j, i in enumerate(random_rows):
                if states[i].generator is not None:
                    noise[j].exponential_(generator=states[i].generator)
            # argmax(p / E) with E ~ Exp(1) draws index k with probability p_k (exponential race)
            tokens[idx] = (probs / noise).argmax(dim=-1)
        return tokens.tolist()


def token_logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    chosen = float(logprobs[token])
    rank = int((logprobs > chosen).sum()) + 1
    top: list[tuple[int, float]] = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token, chosen, rank, top)
