"""The engine's side of speculative decoding: draft before a step, account for verification after it."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from infera.engine.model_runner import StepOutput
from infera.engine.scheduler import ScheduledBatch, Scheduler
from infera.engine.sequence import Sequence, SequenceStatus
from infera.engine.worker import Worker
from infera.spec.controller import SpecController
from infera.spec.proposer import Proposer

if TYPE_CHECKING:
    from infera.outputs import RequestOutput

logger = logging.getLogger("infera")

LOG_INTERVAL = 200  # verification steps between acceptance log lines
MAX_IDLE_STEPS = 8  # most steps without planning after the controller chose no drafts


def build_proposer(method: str, target: Worker) -> Proposer:
    """The proposer named by ``EngineConfig.speculative`` (checked there) for the ``target`` model."""
    if method == "ngram":
        from infera.spec.ngram import NgramProposer

        return NgramProposer()
    if method == "recycle":
        from infera.spec.recycle import RecycleProposer

        return RecycleProposer(target.runner.vocab_size)
    if method.startswith("draft:"):
        from infera.spec.draft_model import DraftModelProposer

        draft = load_draft_model(method.removeprefix("draft:"), target)
        return DraftModelProposer(draft, target.runner.vocab_size, target.config.seed,
                                  target.config.speculative_draft_vocab_size)
    from infera.spec.self_draft import SelfDraftProposer

    return SelfDraftProposer(target, method.removeprefix("self").removeprefix(":"))


def load_draft_model(path: str, target: Worker) -> Worker:
    """The worker of the draft model at ``path`` (``speculative="draft:PATH"``): the target's settings,
    its own KV pool with room for as many tokens as the target's holds, no prefix caching."""
    config = replace(target.config, model=path, max_model_len=target.max_model_len, quantization=None,
                     kv_cache_dtype="auto", enable_prefix_caching=False, kv_offloading_size=None, speculative=None,
                     generation_config="vllm")
    draft = Worker(config, kv_cache_tokens=target.kv_cache_tokens)
    if draft.tokenizer.hf.get_vocab() != target.tokenizer.hf.get_vocab():
        raise ValueError(f"speculative: the draft model {path} does not share the target model's tokenizer")
    return draft


class SpecDecoder:
    """A hook of the engine step (:class:`~infera.engine.step_hook.StepHook`): after each step it
    proposes drafts for the ``scheduler``'s running sequences (the next step verifies them with the
    sequences' own tokens); after sampling it keeps the KV of the accepted drafts, rolls back the
    rest and keeps the acceptance statistics.

    Verification chunks stay within the longest query the ``target``'s model runner batches with
    the decodes (a longer one would run as a prefill)."""

    def __init__(self, proposer: Proposer, target: Worker, scheduler: Scheduler, max_tokens: int):
        self.proposer = proposer
        self.scheduler = scheduler
        self.block_manager = target.block_manager
        self.controller = SpecController(max_tokens)
        self.max_tokens = max_tokens
        self.max_model_len = target.max_model_len
        self.eos_token_ids = set(target.tokenizer.eos_token_ids)
        query_len = target.runner.max_batched_query_len
        self.max_query_len = query_len if query_len > 1 else None  # None: no such limit
        self.num_steps = 0  # steps that verified drafts
        self.num_drafts = 0  # verifications (one sequence, one step)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self._logged = (0, 0, 0, 0)
        self.idle_steps = 0  # steps left before the next plan
        self.backoff = 0  # steps skipped after the last plan that chose no drafts (doubles up to the max)

    # -- at the end of a step, for the next -------------------------------------------------
    def after_step(self, outputs: list[RequestOutput]) -> None:
        self.propose(self.scheduler.running)

    def propose(self, running: list[Sequence]) -> None:
        """Give each running sequence that pays for it draft tokens for the next step.  While the
        controller chooses none (a large batch, low acceptance), it plans again only after a few
        steps (doubling up to ``MAX_IDLE_STEPS``), so a batch that does not speculate does not pay
        for planning either (~0.4 ms a step at batch 16 on a CPU, 2-3% of the step)."""
        self.proposer.release_finished()
        if self.idle_steps:
            self.idle_steps -= 1
            return
        seqs = [s for s in running if self._eligible(s)]
        if not seqs:
            return
        limits = [self._limit(s) for s in seqs]
        decoding = [s for s in running if s.num_output_tokens > 0 and not s.hold_last_token]
        base_tokens = sum(s.num_uncomputed_tokens for s in running)
        ks = self.controller.plan(seqs, limits, base_tokens, len(decoding), self.proposer.draft_cost)
        chosen = [i for i, k in enumerate(ks) if k > 0]
        if not chosen:
            self.backoff = min(2 * self.backoff or 1, MAX_IDLE_STEPS)
            self.idle_steps = self.backoff
            return
        self.backoff = 0
        drafts = self.proposer.propose([seqs[i] for i in chosen], [ks[i] for i in chosen])
        for i, draft in zip(chosen, drafts):
            seq = seqs[i]
            n = self._usable(seq, draft.token_ids[:ks[i]])
            seq.spec_token_ids = draft.token_ids[:n]
            seq.spec_draft_probs = draft.probs[:n] if draft.probs is not None and n else None

    def _eligible(self, seq: Sequence) -> bool:
        return (seq.status == SequenceStatus.RUNNING and seq.finish_reason is None and not seq.hold_last_token
                and seq.num_output_tokens > 0 and not seq.params.needs_penalties and not seq.spec_token_ids
                and (self.max_query_len is None or seq.num_uncomputed_tokens < self.max_query_len))

    def _limit(self, seq: Sequence) -> int:
        limit = min(self.max_tokens, self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        if self.max_query_len is not None:
            limit = min(limit, self.max_query_len - seq.num_uncomputed_tokens)
        return max(limit, 0)

    def _usable(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of the drafts are worth verifying: up to the first stop token (included) and
        only what the sequence's grammar accepts."""
        stops = self.eos_token_ids | set(seq.params.stop_token_ids) if not seq.params.ignore_eos else set()
        n = next((j + 1 for j, t in enumerate(tokens) if t in stops), len(tokens))
        if seq.grammar_state is not None:
            n = seq.grammar_state.valid_prefix(tokens[:n])
        return n

    # -- after a step's forward pass and sampling --------------------------------------------
    def after_sampling(self, seq: Sequence, inputs: list[int], draft: list[int], out: StepOutput) -> None:
        """``seq`` had ``draft`` verified (possibly empty): ``out.num_accepted`` were accepted.  The
        KV of the accepted drafts the sequence kept (it may have stopped before) is committed, the
        rest rolled back."""
        if draft:
            self.block_manager.commit(seq, min(out.num_accepted, seq.num_tokens - seq.num_computed_tokens))
            self.block_manager.truncate(seq, seq.num_computed_tokens)
            self.num_drafts += 1
            self.num_draft_tokens += len(draft)
            self.num_accepted_tokens += out.num_accepted
            self.controller.update(seq, len(draft), out.num_accepted)
        self.proposer.observe(seq, inputs, out)

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        """Time a step for the cost model (decode and verification steps only) and log acceptance."""
        if batch.num_tokens <= len(batch.seqs) * (1 + self.max_tokens):
            self.controller.step_cost.add(batch.num_tokens, seconds)
        if any(len(s.spec_token_ids) for s in batch.seqs):
            self.num_steps += 1
            if self.num_steps % LOG_INTERVAL == 0:
                self._log()

    def _log(self) -> None:
        steps, drafts, drafted, accepted = (a - b for a, b in zip(self.counters, self._logged))
        self._logged = self.counters
        logger.info("speculative decoding (%s), last %d steps: acceptance rate %.1f%%, mean acceptance length "
                    "%.2f tokens per verification, %.1f draft tokens per verification", self.proposer.name, steps,
                    100 * accepted / max(drafted, 1), 1 + accepted / max(drafts, 1), drafted / max(drafts, 1))

    @property
    def counters(self) -> tuple[int, int, int, int]:
        return self.num_steps, self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens

    @property
    def stats(self) -> dict[str, float]:
        return {"spec_drafts": self.num_drafts, "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
                "spec_mean_acceptance_length": 1 + self.num_accepted_tokens / max(self.num_drafts, 1)}
