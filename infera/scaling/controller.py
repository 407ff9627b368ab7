"""Runs scaling searches inside one LLMEngine, all branches of all problems batched together.

A search (one problem, one method) is a generator: it yields a list of operations and is resumed
with their results.  An operation is either *expand* (continue a branch by one reasoning step, in
``n`` ways) or *judge* (read the model's next-token distribution after a branch plus a question).
The :class:`SearchController` is an engine driver: it turns operations into engine requests,
which the normal scheduler batches with everything else in flight, and resumes a search as soon
as all its operations are done.

KV sharing: a branch that ends a step keeps its KV blocks (a *retained* request); continuing it,
resampling it several times or judging it starts a request with the branch as *parent*, which
shares those blocks copy-on-write, so nothing before the branch's last token is computed again.
A branch that is pruned, not resampled or finished is released at once, freeing its blocks.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import queue
import random
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infera.engine.llm_engine import LLMEngine, Request
from infera.engine.sequence import Sequence
from infera.outputs import RequestOutput
from infera.sampling_params import MAX_LOGPROBS, SamplingParams
from infera.scaling.answers import AnswerExtractor
from infera.scaling.problem import Problem, judge_suffix
from infera.scaling.result import Candidate, ScalingResult

if TYPE_CHECKING:
    from infera.scaling.rewards import Reward

logger = logging.getLogger(__name__)

AGGREGATIONS = ("last", "min", "product")


@dataclass(eq=False)
class Branch:
    """One partial solution: its tokens (prompt included), its steps and their scores, and the
    parked engine sequence that holds its KV blocks (None once released)."""

    token_ids: list[int]
    num_prompt_tokens: int
    steps: list[str] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)  # answer tokens at the end of each step
    scores: list[float] = field(default_factory=list)
    num_scored_steps: int = 0
    seq: Sequence | None = None
    finish_reason: str | None = None
    parent: Branch | None = None

    @property
    def text(self) -> str:
        return "".join(self.steps)

    @property
    def num_answer_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def prefix(self, num_steps: int) -> Branch:
        """The branch as it was after ``num_steps`` steps (its KV from the prefix cache)."""
        end = self.num_prompt_tokens + (self.step_ends[num_steps - 1] if num_steps else 0)
        done = num_steps == len(self.steps)
        return Branch(self.token_ids[:end], self.num_prompt_tokens, self.steps[:num_steps],
                      self.step_ends[:num_steps], self.scores[:num_steps], num_steps,
                      finish_reason=self.finish_reason if done else None)


@dataclass
class Expand:
    """Continue ``branch`` by one step in ``n`` ways; the result is the ``n`` new branches."""

    branch: Branch
    n: int
    params: SamplingParams


@dataclass
class Judge:
    """The top next-token log-probabilities after ``branch`` followed by ``suffix``."""

    branch: Branch
    suffix: list[int]


Op = Expand | Judge
SearchGen = Generator[list[Op], list[Any], Any]  # a method returns a ScalingResult


@dataclass
class SearchConfig:
    """Options every method shares.  A step ends at ``delimiter`` (None: a step is the whole
    answer), at the end of the sequence or after ``step_max_tokens``; a solution ends at the end
    of the sequence, after ``max_tokens``/``max_steps``, or (``stop_on_answer``) once it marks
    an answer (``answer_pattern``; default ``\\boxed{}``)."""

    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 512
    step_max_tokens: int = 256
    max_steps: int = 32
    delimiter: str | None = "\n\n"
    stop_on_answer: bool = True
    answer_pattern: str | None = None
    aggregate: str | None = None  # last, min or product; None: the reward's own default
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "step_max_tokens", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.aggregate is not None and self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {self.aggregate!r}")
        if self.delimiter == "":
            raise ValueError("delimiter must be a non-empty string or None")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)  # validates them


def aggregate(scores: list[float], how: str) -> float:
    """Step scores -> one score: the last one, the minimum or the product (0.0 with none)."""
    if not scores:
        return 0.0
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    product = 1.0
    for s in scores:
        product *= s
    return product


_search_ids = itertools.count()


class Search:
    """One problem under one method: the method's generator plus the state it shares with it
    (random numbers, reward, answer extraction) and the tokens spent."""

    def __init__(self, method: str, algorithm: Callable[..., SearchGen], problem: Problem, budget: int,
                 reward: Reward | None, config: SearchConfig, options: dict[str, Any]):
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        self.id = f"scaling-{next(_search_ids)}"
        self.method, self.problem, self.budget = method, problem, budget
        self.reward, self.config = reward, config
        self.aggregation = config.aggregate or (reward.aggregate if reward is not None else "last")
        self.extract = AnswerExtractor(config.answer_pattern)
        # a seeded search depends on its seed and prompt only (problems draw independent streams)
        self.rng = random.Random(None if config.seed is None else f"{config.seed}/{problem.prompt_ids}")
        self.root = Branch(list(problem.prompt_ids), len(problem.prompt_ids))
        self.gen = algorithm(self, **options)
        self.controller: SearchController | None = None
        self.live: set[Branch] = set()  # branches holding KV blocks
        self.result: ScalingResult | list[ScalingResult] | None = None
        self.error: BaseException | None = None
        self.on_done: Callable[[Search], None] | None = None
        self.started = self.finished_at = 0.0
        self.generated_tokens = self.prefill_tokens = self.cached_tokens = self.judge_passes = self.steps = 0
        self._judge_suffix: list[int] | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    # -- for the methods --------------------------------------------------------------------
    def expand(self, requests: list[tuple[Branch, int]]) -> Generator[list[Op], list[Any], list[list[Branch]]]:
        """Continue each ``(branch, n)`` by one step in ``n`` ways; the parents are released."""
        requests = [(b, n) for b, n in requests if n > 0]
        if not requests:
            return []
        self.steps += 1
        return (yield [Expand(b, n, self.step_params(b, n)) for b, n in requests])

    def judge(self, branches: list[Branch]) -> Generator[list[Op], list[Any], list[list[tuple[int, float]]]]:
        """The model's top next-token log-probabilities after each branch and a judging question."""
        if self._judge_suffix is None:
            self._judge_suffix = judge_suffix(self.controller.engine.tokenizer, self.problem)
        return (yield [Judge(b, self._judge_suffix) for b in branches])

    def score(self, branches: list[Branch]) -> Generator[list[Op], list[Any], None]:
        """Score the steps of ``branches`` that have no score yet; then release the finished ones."""
        todo = [b for b in dict.fromkeys(branches) if b.num_scored_steps < len(b.steps)]
        if self.reward is not None and todo:
            new = self.reward.score(self, todo)
            if inspect.isgenerator(new):
                new = yield from new
            for b, scores in zip(todo, new):
                b.scores.extend(scores)
                b.num_scored_steps = len(b.steps)
        for b in branches:
            if b.finished:
                self.release(b)

    def value(self, branch: Branch) -> float:
        return aggregate(branch.scores, self.aggregation)

    def release(self, branch: Branch) -> None:
        """Free the branch's KV blocks now (a pruned or finished branch)."""
        if branch.seq is not None:
            self.controller.engine.release(branch.seq)
            branch.seq = None
            self.live.discard(branch)

    def step_limit(self, branch: Branch) -> int:
        """The most tokens the branch's next step may have."""
        return min(self.config.step_max_tokens, self.config.max_tokens - branch.num_answer_tokens)

    def step_params(self, branch: Branch, n: int) -> SamplingParams:
        cfg = self.config
        return SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=self.step_limit(branch),
                              stop=[cfg.delimiter] if cfg.delimiter else None, include_stop_str_in_output=True,
                              seed=self.rng.randrange(2**62) if cfg.seed is not None else None)

    def finish(self, chosen: Branch, candidates: list[Branch], answer_scores: dict[str, float] | None = None
               ) -> ScalingResult:
        """The result: ``chosen`` among ``candidates`` (each listed once)."""
        unique = list(dict.fromkeys(candidates))
        cands = [Candidate(b.text, list(b.steps), self.extract(b.text),
                           self.value(b) if self.reward is not None else None, list(b.scores),
                           b.num_answer_tokens, b.finish_reason) for b in unique]
        return ScalingResult(self.method, self.budget, self.extract(chosen.text), chosen.text, cands,
                             answer_scores or {}, steps=self.steps)

    # -- for the controller -----------------------------------------------------------------
    def child(self, parent: Branch, token_ids: list[int], step: str, finish_reason: str | None,
              stop_reason: int | str | None, seq: Sequence | None = None) -> Branch:
        """The branch made of ``parent`` by one more step (``token_ids``: all of it, prompt
        included; ``finish_reason``/``stop_reason``: how the step's generation ended; ``seq``:
        the parked sequence holding its KV, if any)."""
        cfg = self.config
        branch = Branch(list(token_ids), parent.num_prompt_tokens, [*parent.steps, step],
                        [*parent.step_ends, len(token_ids) - parent.num_prompt_tokens], list(parent.scores),
                        parent.num_scored_steps, seq, parent=parent)
        num_new = len(token_ids) - len(parent.token_ids)
        self.generated_tokens += num_new
        if finish_reason == "stop" and stop_reason != cfg.delimiter:
            branch.finish_reason = "stop"  # end of sequence (or a stop token)
        elif branch.num_answer_tokens >= cfg.max_tokens or (
                finish_reason == "length" and num_new < self.step_limit(parent)):  # the context is full
            branch.finish_reason = "length"
        elif cfg.stop_on_answer and self.extract.marked(branch.text) is not None:
            branch.finish_reason = "answer"
        elif len(branch.steps) >= cfg.max_steps:
            branch.finish_reason = "steps"
        if seq is not None and seq.block_table:
            self.live.add(branch)
        else:
            branch.seq = None
        return branch


class SearchController:
    """Drives searches through one engine (an :class:`~infera.engine.llm_engine.EngineDriver`).

    ``submit`` and ``cancel`` may be called from any thread; everything else runs on the thread
    that steps the engine.  A new search starts while the searches in flight hold fewer than
    ``max_branches`` branches (default: the engine's ``max_num_seqs``) and the KV cache is less
    than ``max_kv_usage`` full, or when nothing else runs.
    """

    def __init__(self, engine: LLMEngine, max_branches: int | None = None, max_kv_usage: float = 0.6):
        self.engine = engine
        self.max_branches = max_branches or engine.config.max_num_seqs
        self.max_kv_usage = max_kv_usage
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Search] = deque()
        self.active: dict[str, Search] = {}
        self.pending: dict[str, tuple[Search, int, Op, Request]] = {}  # request id -> what it is for
        self._results: dict[Search, list[Any]] = {}
        self._ids = itertools.count()

    # -- any thread -------------------------------------------------------------------------
    def submit(self, search: Search, on_done: Callable[[Search], None] | None = None) -> None:
        search.on_done = on_done
        self.inbox.put(("submit", search))

    def cancel(self, search_id: str) -> None:
        self.inbox.put(("cancel", search_id))

    @property
    def num_waiting(self) -> int:
        """Searches submitted and not started yet (the inbox may also hold cancels: an upper bound)."""
        return len(self.waiting) + self.inbox.qsize()

    # -- engine thread ------------------------------------------------------------------------
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

    def has_work(self) -> bool:
        return bool(self.active or self.waiting or not self.inbox.empty())

    def before_step(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self.waiting.append(item)
            else:
                self._cancel(item)
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
        branches = sum(s.budget for s in self.active.values())
        return branches + search.budget <= self.max_branches and self.engine.block_manager.usage < self.max_kv_usage

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
                             seq.stop_reason, seq) for seq in sorted(req.seqs, key=lambda s: s.index)]

    def _step_text(self, parent: Branch, seq: Sequence) -> str:
        """The text ``seq`` added to ``parent`` (decoded with the answer before it, so that a
        token split across the step boundary decodes right)."""
        tokenizer = self.engine.tokenizer
        full, before = tokenizer.decode(seq.token_ids[parent.num_prompt_tokens:]), parent.text
        if full.startswith(before):
            return full[len(before):]
        return tokenizer.decode(seq.token_ids[len(parent.token_ids):])

    def _cancel(self, search_id: str) -> None:
        for s in list(self.waiting):
            if s.id == search_id:
                self.waiting.remove(s)
                self._end(s, error=RuntimeError("cancelled"))
        if search_id in self.active:
            self._end(self.active[search_id], error=RuntimeError("cancelled"))

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
