"""Structured output through xgrammar: JSON schema, any JSON object, regex, EBNF grammar, choice.

The engine owns one ``StructuredOutputManager``, a hook at the named points of its steps
(``infera.engine.step_hook``).  A constrained request is validated in ``add_request``
(``grammar_for`` raises ValueError), then its sequences wait here until their grammar has compiled
in the background (``add``, then ``admit`` at a step's admission); others keep running meanwhile.
Each step the model runner fills the batch's token bitmask (``bitmask.fill``), before the
forward pass on a CPU and while it runs on a GPU, and the sampler applies it; after sampling,
``on_token`` moves each sequence's matcher past its new token, ends the sequence when the
grammar has accepted its stop token, and, in small batches, appends the text the grammar forces
next (jump-forward), whose KV the next step computes as one multi-token chunk; ``on_finish``
releases the matcher.

A server awaits ``compile_async`` before it adds a constrained request: it refuses (ValueError)
a constraint that is invalid, over a bound, or that does not compile within
GRAMMAR_COMPILE_TIMEOUT_S, and leaves the compiled grammar in the cache for ``add_request``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING

import xgrammar as xgr

from infera.loader.tokenizer import Tokenizer
from infera.sampling_params import SamplingParams
from infera.structured.bitmask import BatchBitmask, TokenBitmask
from infera.structured.grammar_compiler import CompileQueueFullError, GrammarCompiler
from infera.structured.matcher import GrammarState

if TYPE_CHECKING:
    from infera.engine.output_processor import OutputProcessor
    from infera.engine.sequence import Sequence

__all__ = ["GRAMMAR_COMPILE_TIMEOUT_S", "JUMP_FORWARD_MAX_BATCH", "MAX_PENDING_COMPILES", "BatchBitmask",
           "CompileQueueFullError", "GrammarCompiler", "GrammarState", "StructuredOutputManager", "TokenBitmask"]

logger = logging.getLogger(__name__)

GRAMMAR_COMPILE_TIMEOUT_S = 5.0
# Compiles a server request may queue behind (timed-out compiles run on, and count, until they end);
# past it the request is refused (CompileQueueFullError) rather than left to time out
MAX_PENDING_COMPILES = 8  # compile_async's default, as vLLM's
ADMIT_WAIT_S = 0.05  # longest an idle engine step waits for a compilation
# Jump-forward only in steps that sample at most this many sequences (0: never).  Forced tokens
# turn the sequence's next step into a short multi-token query.  Measured with every run paying
# its own prefill (benchmarks/structured.py, medians of 3, AMD EPYC, 2026-12-06): at batch 1
# 1.87x / 1.34x of free generation for a JSON schema / a regex (0.95x / 1.02x without it), at
# batch 32 1.10x / 1.02x (0.99x / 0.96x without it); larger batches are not measured.
JUMP_FORWARD_MAX_BATCH = 32


class StructuredOutputManager:
    """``output_processor`` appends the tokens a grammar forces (jump-forward)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, output_processor: OutputProcessor | None = None,
                 jump_forward_max_batch: int = JUMP_FORWARD_MAX_BATCH):
        self.tokenizer = tokenizer
        self.output_processor = output_processor
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(tokenizer.eos_token_ids)
        self.bitmask = TokenBitmask(vocab_size, self.stop_token_ids)
        self.jump_forward_max_batch = jump_forward_max_batch  # 0: never jump forward
        self.waiting: list[Sequence] = []
        self.num_forced_tokens = 0  # tokens appended by jump-forward, without a sampling step each
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on the first constrained request (reading the vocabulary takes ~0.15 s), once
        whichever threads ask for it."""
        if self._compiler is None:
            with self._compiler_lock:
                if self._compiler is None:
                    self._compiler = GrammarCompiler(self.tokenizer.hf, self.vocab_size, self.stop_token_ids)
        return self._compiler

    def grammar_for(self, params: SamplingParams) -> Future[xgr.CompiledGrammar] | None:
        """The compiled grammar (a future) of a request; ValueError if its constraint is invalid."""
        return None if params.structured is None else self.compiler.submit(params.structured)

    async def compile_async(self, params: SamplingParams, timeout_s: float = GRAMMAR_COMPILE_TIMEOUT_S) -> None:
        """Validate and compile a request's grammar without blocking the event loop, so that
        ``grammar_for`` then finds it compiled; ValueError if the constraint is invalid, fails
        to compile, or is not compiled within ``timeout_s`` (time queued behind other compiles
        included).  A compile that times out goes on in the background and is cached when it
        ends: the timeout abandons the wait, not the work, which xgrammar cannot interrupt."""
        if params.structured is None:
            return
        future = await asyncio.to_thread(self.compiler.submit, params.structured, MAX_PENDING_COMPILES)
        try:
            # shield: the timeout must not cancel the future, which other requests may share
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except TimeoutError:
            raise ValueError(f"structured output: the grammar did not compile within {timeout_s:g} s; "
                             f"simplify the schema") from None
        except Exception as e:  # xgrammar raises RuntimeError
            raise ValueError(f"structured output: the grammar did not compile ({e})") from None

    # -- sequences waiting for their grammar ------------------------------------------------
    def add(self, seq: Sequence, grammar: Future[xgr.CompiledGrammar]) -> None:
        """Give ``seq`` its grammar state and hold it until the grammar has compiled."""
        seq.grammar_state = GrammarState(grammar)
        self.waiting.append(seq)

    def admit(self, idle: bool = False) -> list[Sequence]:
        """Sequences whose grammar is ready, in arrival order.  When ``idle`` (the engine has
        nothing else to run) wait up to ADMIT_WAIT_S for a compilation to finish."""
        if not self.waiting:
            return []
        if idle:  # bounded, so that an engine thread still sees aborts while a big grammar compiles
            wait_futures({s.grammar_state.grammar for s in self.waiting}, ADMIT_WAIT_S, FIRST_COMPLETED)
        ready = [s for s in self.waiting if s.grammar_state.ready]
        if ready:
            self.waiting = [s for s in self.waiting if not s.grammar_state.ready]
        return ready

    def on_finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's matcher (and forget it if it was still waiting)."""
        if seq.grammar_state is None:
            return
        seq.grammar_state.release()
        if seq in self.waiting:
            self.waiting.remove(seq)

    # -- per step ---------------------------------------------------------------------------
    def on_token(self, seq: Sequence, last: bool = True) -> int:
        """Move the matcher past the token just appended to ``seq`` and finish or extend the
        sequence as the grammar says (no jump-forward unless ``last``: more verified tokens
        follow).  Returns the number of forced tokens appended."""
        state = seq.grammar_state
        if state is None:
            return 0
        forced = 0
        if not state.accept(seq.token_ids[-1]):
            if not state.failed:
                logger.warning("structured output: request %s sampled token %d that its grammar rejects",
                               seq.request_id, seq.token_ids[-1])
            seq.finish_reason, seq.stop_reason = "abort", None
        elif state.is_terminated:
            seq.finish_reason = "stop"  # the grammar is complete and accepted its stop token
        elif (last and seq.finish_reason is None and seq.params.logprobs is None
              and self.bitmask.num_rows <= self.jump_forward_max_batch):
            forced = self._jump_forward(seq, state)
        return forced

    def _jump_forward(self, seq: Sequence, state: GrammarState) -> int:
        """Append the tokens of the text the grammar forces next; the engine computes their KV
        in the next step as one chunk, instead of one decode step per token."""
        # whitespace that ends the forced text waits for the model, which writes it merged with what
        # follows (` {` is one token; a lone space token puts a model off its usual tokens)
        text = state.jump_forward_string().rstrip()
        if not text:
            return 0
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.tokenizer.decode(ids, skip_special_tokens=False) != text:
            return 0  # the tokenizer would not reproduce the text on its own (e.g. a prefix space)
        forced = 0
        for t in ids:
            if not state.accept(t):
                break
            self.output_processor.append_token(seq, t, None)
            forced += 1
            if seq.finish_reason is not None:
                break
        self.num_forced_tokens += forced
        return forced
