"""Runs scaling searches inside one LLMEngine, all branches of all problems batched together.

The :class:`SearchController` is an engine driver: it turns a search's operations (see
:mod:`infera.scaling.search`) into engine requests, which the normal scheduler batches with
everything else in flight, and resumes a search as soon as all its operations are done.  Offline,
:meth:`SearchController.run` steps the engine itself; in the server a :class:`SearchJob` enters
through the async engine's queue (``AsyncLLMEngine.run_job``) and is built and run on the engine
thread.

KV sharing: a branch that ends a step keeps its KV blocks (a *retained* request); continuing it,
resampling it several times or judging it starts a request with the branch as *parent*, which
shares those blocks copy-on-write, so nothing before the branch's last token is computed again.
A branch that is pruned, not resampled or finished is released at once, freeing its blocks.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infera.engine.llm_engine import LLMEngine, Request
from infera.engine.sequence import Sequence
from infera.outputs import RequestOutput, TokenLogprobs
from infera.sampling_params import MAX_LOGPROBS, SamplingParams
from infera.scaling.result import ScalingResult
from infera.scaling.search import Branch, Expand, Judge, Op, Search

logger = logging.getLogger(__name__)


def token_confidence(logprobs: TokenLogprobs) -> float:
    """Minus the mean log-probability of the token's top candidates (DeepConf's token confidence)."""
    top = logprobs.top or [(logprobs.token_id, logprobs.logprob)]
    return -sum(lp for _, lp in top) / len(top)


class SearchController:
    """Drives searches through one engine (an :class:`~infera.engine.llm_engine.EngineDriver`), on
    the thread that steps it.  A new search starts while the searches in flight hold fewer than
    ``max_branches`` branches (default: the engine's ``max_num_seqs``) and the KV cache is less
    than ``max_kv_usage`` full, or when nothing else runs.
    """

    def __init__(self, engine: LLMEngine, max_branches: int | None = None, max_kv_usage: float = 0.6):
        self.engine = engine
        self.max_branches = max_branches or engine.config.max_num_seqs
        self.max_kv_usage = max_kv_usage
        self.waiting: deque[Search] = deque()
        self.active: dict[str, Search] = {}
        self.pending: dict[str, tuple[Search, int, Op, Request]] = {}  # request id -> what it is for
        self._results: dict[Search, list[Any]] = {}
        self._ids = itertools.count()

    @classmethod
    def of(cls, engine: LLMEngine) -> SearchController:
        """The engine's search driver, registered on first use."""
        for driver in engine.drivers:
            if isinstance(driver, cls):
                return driver
        controller = cls(engine)
        engine.drivers.append(controller)
        return controller

    def submit(self, search: Search, on_done: Callable[[Search], None] | None = None) -> None:
        search.on_done = on_done
        self.waiting.append(search)

    def cancel(self, search_id: str) -> None:
        for s in list(self.waiting):
            if s.id == search_id:
                self.waiting.remove(s)
                self._end(s, error=RuntimeError("cancelled"))
        if search_id in self.active:
            self._end(self.active[search_id], error=RuntimeError("cancelled"))

    def run(self, searches: list[Search], progress: Callable[[Search], None] | None = None) -> list[Search]:
        """Run ``searches`` to the end on this thread (the offline path); ``progress`` is called
        as each one finishes."""
        self.engine.drivers.append(self)
        try:
            for s in searches:
                self.submit(s, progress)
            while not all(s.done for s in searches):
                self.engine.step()
        finally:
            self.engine.drivers.remove(self)
            for s in searches:
                if not s.done:
                    self._end(s, error=RuntimeError("interrupted"))
        return searches

    # -- EngineDriver -----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def before_step(self) -> None:
        lost = {s for rid, (s, _, _, _) in self.pending.items() if rid not in self.engine.requests}
        for search in lost:  # someone else aborted its requests (e.g. after a failed engine step)
            self._end(search, error=RuntimeError("the engine aborted the search's requests"))
        while self.waiting and (not self.active or self._has_room(self.waiting[0])):
            search = self.waiting.popleft()
            search.controller, search.started = self, time.monotonic()
            self.active[search.id] = search
            self._advance(search, None)

    def after_step(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not out.finished or out.request_id not in self.pending:
                continue
            search, index, op, req = self.pending.pop(out.request_id)
            try:
                self._results[search][index] = self._collect(search, op, req)
            except Exception as e:  # noqa: BLE001 - a failing reward or method fails its search only
                self._release_request(req)
                self._end(search, error=e)
                continue
            if not any(s is search for s, _, _, _ in self.pending.values()):
                self._advance(search, self._results.pop(search))

    # -- internals ------------------------------------------------------------------------------
    def _has_room(self, search: Search) -> bool:
        branches = sum(s.width for s in self.active.values())
        return branches + search.width <= self.max_branches and self.engine.block_manager.usage < self.max_kv_usage

    def _advance(self, search: Search, results: list[Any] | None) -> None:
        """Resume ``search`` with ``results`` and submit the operations it asks for next."""
        try:
            ops = search.gen.send(results)
            while not ops:
                ops = search.gen.send([])
            self._results[search] = [None] * len(ops)
            for index, op in enumerate(ops):
                self._submit(search, index, op)
            for op in ops:  # an expanded branch lives on in its children
                if isinstance(op, Expand) and op.branch is not search.root:
                    search.release(op.branch)
        except StopIteration as stop:
            self._end(search, result=stop.value)
        except Exception as e:  # noqa: BLE001 - fail this search, keep the engine serving the rest
            self._end(search, error=e)

    def _submit(self, search: Search, index: int, op: Op) -> None:
        rid = f"{search.id}-{next(self._ids)}"
        b = op.branch
        if isinstance(op, Expand):
            self.engine.add_request(b.token_ids, op.params, rid, parent=b.seq, retain=True)
        else:
            ids = b.token_ids[:-1] if b.token_ids[-1] in self.engine.tokenizer.eos_token_ids else b.token_ids
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=MAX_LOGPROBS)
            self.engine.add_request(ids + op.suffix, params, rid, parent=b.seq)
        self.pending[rid] = (search, index, op, self.engine.requests[rid])

    def _collect(self, search: Search, op: Op, req: Request) -> Any:
        search.prefill_tokens += req.num_computed_prompt_tokens
        search.cached_tokens += req.params.n * len(req.prompt_token_ids) - req.num_computed_prompt_tokens
        if isinstance(op, Judge):
            search.judge_passes += 1
            lp = req.seqs[0].logprobs[0]
            return [(lp.token_id, lp.logprob), *lp.top]
        return [search.child(op.branch, seq.token_ids, self._step_text(op.branch, seq), seq.finish_reason,
                             seq.stop_reason, seq, [token_confidence(lp) for lp in seq.logprobs])
                for seq in sorted(req.seqs, key=lambda s: s.index)]

    def _step_text(self, parent: Branch, seq: Sequence) -> str:
        """The text ``seq`` added to ``parent`` (decoded with the answer before it, so that a
        token split across the step boundary decodes right)."""
        tokenizer = self.engine.tokenizer
        full, before = tokenizer.decode(seq.token_ids[parent.num_prompt_tokens:]), parent.text
        if full.startswith(before):
            return full[len(before):]
        return tokenizer.decode(seq.token_ids[len(parent.token_ids):])

    def _end(self, search: Search, result: ScalingResult | list[ScalingResult] | None = None,
             error: BaseException | None = None) -> None:
        """Finish ``search``: abort what it still runs, free every block it holds, report."""
        for rid in [rid for rid, (s, _, _, _) in self.pending.items() if s is search]:
            self.engine.abort_request(rid)
            self._release_request(self.pending.pop(rid)[3])
        for branch in list(search.live):
            search.release(branch)
        self._results.pop(search, None)
        self.active.pop(search.id, None)
        search.gen.close()
        search.finished_at = time.monotonic()
        if result is not None:
            for r in result if isinstance(result, list) else [result]:  # several choices from one search
                r.generated_tokens, r.prefill_tokens = search.generated_tokens, search.prefill_tokens
                r.cached_tokens, r.judge_passes = search.cached_tokens, search.judge_passes
                r.wall_s = search.finished_at - search.started
            search.result = result
        else:
            if not isinstance(error, RuntimeError) or str(error) not in ("cancelled", "interrupted"):
                logger.warning("scaling search %s (%s) failed: %s", search.id, search.method, error)
            search.error = error
        if search.on_done is not None:
            search.on_done(search)

    def _release_request(self, req: Request) -> None:
        """Free the blocks its finished samples still hold (a retained request)."""
        for seq in req.seqs:
            if seq.is_finished:
                self.engine.release(seq)


@dataclass
class SearchOutcome:
    """What a server answers from a finished search (it crosses from an engine replica's process)."""

    search_id: str
    num_prompt_tokens: int
    result: ScalingResult | list[ScalingResult] | None
    error: BaseException | None

    @classmethod
    def of(cls, search: Search) -> SearchOutcome:
        return cls(search.id, len(search.problem.prompt_ids), search.result, search.error)


class SearchJob:
    """A search as an async-engine job (``AsyncLLMEngine.run_job``): ``build(engine)`` makes it on
    the engine thread, where it then runs under the engine's :class:`SearchController`; ``outcome``
    is set when it ends (by the replica pool, for a job it ran on a replica)."""

    def __init__(self, build: Callable[[LLMEngine], Search]):
        self.build = build
        self.search: Search | None = None
        self.outcome: SearchOutcome | None = None
        self._controller: SearchController | None = None

    def start(self, engine: LLMEngine, done: Callable[[], None]) -> None:
        self._controller = SearchController.of(engine)
        self.search = self.build(engine)

        def ended(search: Search) -> None:
            self.outcome = SearchOutcome.of(search)
            done()

        self._controller.submit(self.search, ended)

    def cancel(self) -> None:
        if self.search is not None and not self.search.done:
            self._controller.cancel(self.search.id)
