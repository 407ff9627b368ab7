"""Per-sequence grammar state: an xgrammar matcher advanced with every accepted token."""
from __future__ import annotations

import logging
from concurrent.futures import Future

import xgrammar as xgr

logger = logging.getLogger(__name__)


class GrammarState:
    """Lives in ``Sequence.grammar_state``.  The matcher is created once the grammar has been
    compiled (the engine does not schedule the sequence before that).  Preemption keeps it
    as is: a preempted sequence keeps its tokens, so its matcher stays in step with them."""

    def __init__(self, grammar: Future[xgr.CompiledGrammar]):
        self.grammar = grammar
        self._matcher: xgr.GrammarMatcher | None = None
        self.failed = False  # the grammar did not compile: the sequence is ended with "abort"
        self.released = False

    @property
    def ready(self) -> bool:
        return self.grammar.done()

    @property
    def matcher(self) -> xgr.GrammarMatcher | None:
        if self._matcher is None and not self.failed and not self.released:
            try:
                self._matcher = xgr.GrammarMatcher(self.grammar.result())
            except Exception as e:  # parsed fine but would not compile (resources, internal error)
                logger.error("structured output: grammar compilation failed: %s", e)
                self.failed = True
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False if the grammar rejects it."""
        matcher = self.matcher
        return matcher is not None and matcher.accept_token(token_id)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of ``token_ids`` (draft tokens) the grammar accepts in a row from here; the
        matcher is left where it was."""
        matcher = self.matcher
        n = 0
        if matcher is None:
            return n
        for t in token_ids:
            if matcher.is_terminated() or not matcher.accept_token(t):
                break
            n += 1
        if n:
            matcher.rollback(n)
        return n

    def jump_forward_string(self) -> str:
        """The text the grammar forces next (empty if there is a choice)."""
        return self._matcher.find_jump_forward_string() if self._matcher is not None else ""

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return self._matcher is not None and self._matcher.is_terminated()

    def fork(self) -> GrammarState:
        """An independent copy at the same point (a fork of the sequence)."""
        child = GrammarState(self.grammar)
        child.failed = self.failed
        if self._matcher is not None:
            child._matcher = self._matcher.fork()
        return child

    def release(self) -> None:
        """Drop the matcher once the sequence has finished."""
        self._matcher = None
        self.released = True
