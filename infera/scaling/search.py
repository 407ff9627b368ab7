"""A scaling search's state: one problem under one method, its branches and the operations it asks for.

A search is a generator: it yields a list of operations and is resumed with their results.  An
operation is either *expand* (continue a branch by one reasoning step, in ``n`` ways) or *judge*
(read the model's next-token distribution after a branch plus a question).  The
:class:`~infera.scaling.controller.SearchController` runs them through the engine.
"""
from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infera.engine.sequence import Sequence
from infera.sampling_params import SamplingParams
from infera.scaling.answers import AnswerExtractor
from infera.scaling.problem import Problem, judge_suffix
from infera.scaling.result import Candidate, ScalingResult
from infera.scaling.stopping import CONFIDENCE_TOP_K, StoppingRule, trace_confidence

if TYPE_CHECKING:
    from infera.scaling.controller import SearchController
    from infera.scaling.rewards import Reward

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
    confidences: list[float] = field(default_factory=list)  # per answer token (adaptive stopping: deepconf)

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
    an answer (``answer_pattern``; default ``\\boxed{}``), or (``cut_loops``) once a step repeats one
    of its last LOOP_LOOKBACK steps.  Sampling methods only: ``stop``, an adaptive stopping rule of
    :mod:`infera.scaling.stopping` with its ``stop_*`` options; ``reject_below``, a sample whose step
    scores below it is ended there (early rejection) and is no candidate."""

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
    stop: str | None = None
    stop_window: int | None = None
    stop_confidence: float = 0.95
    stop_m: int | None = None
    stop_keep: float | None = None
    reject_below: float | None = None
    cut_loops: bool = True

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
        self.stopping = StoppingRule.make(self.stop, self.stop_window, self.stop_confidence, self.stop_m,
                                          self.stop_keep)


LOOP_LOOKBACK = 4  # steps a new step is compared with (cut_loops)


def repeats_itself(steps: list[str]) -> bool:
    """Whether the last step (at least two characters, whitespace aside) repeats one of the
    LOOP_LOOKBACK before it."""
    last = steps[-1].strip()
    return len(last) >= 2 and any(last == s.strip() for s in steps[-1 - LOOP_LOOKBACK:-1])


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


@dataclass
class TokenPool:
    """Generated tokens shared by a batch of problems (``solve(..., token_budget=...)``): once
    ``limit`` are spent, every sampling search stops and chooses among its finished samples, so the
    problems that settle early (adaptive stopping) leave their share to the undecided ones."""

    limit: int
    spent: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ValueError(f"token_budget must be a positive integer, got {self.limit!r}")

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.limit


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
        self.pool: TokenPool | None = None  # shared with the other problems of one solve()
        self.live: set[Branch] = set()  # branches holding KV blocks
        self.result: ScalingResult | list[ScalingResult] | None = None
        self.error: BaseException | None = None
        self.on_done: Callable[[Search], None] | None = None
        self.started = self.finished_at = 0.0
        self.generated_tokens = self.prefill_tokens = self.cached_tokens = self.judge_passes = self.steps = 0
        self._judge_suffix: list[int] | None = None

    @property
    def width(self) -> int:
        """The most branches it runs at once: its budget, or a stopping rule's widest window."""
        rule = self.config.stopping
        return self.budget if rule is None else rule.width(self.budget)

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
        confident = cfg.stopping is not None and cfg.stopping.needs_confidence
        return SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=self.step_limit(branch),
                              stop=[cfg.delimiter] if cfg.delimiter else None, include_stop_str_in_output=True,
                              seed=self.rng.randrange(2**62) if cfg.seed is not None else None,
                              logprobs=CONFIDENCE_TOP_K if confident else None)

    def finish(self, chosen: Branch, candidates: list[Branch], answer_scores: dict[str, float] | None = None
               ) -> ScalingResult:
        """The result: ``chosen`` among ``candidates`` (each listed once)."""
        unique = list(dict.fromkeys(candidates))
        cands = [Candidate(b.text, list(b.steps), self.extract(b.text),
                           self.value(b) if self.reward is not None else None, list(b.scores),
                           b.num_answer_tokens, b.finish_reason,
                           trace_confidence(b.confidences) if b.confidences else None) for b in unique]
        return ScalingResult(self.method, self.budget, self.extract(chosen.text), chosen.text, cands,
                             answer_scores or {}, steps=self.steps)

    # -- for the controller -----------------------------------------------------------------
    def child(self, parent: Branch, token_ids: list[int], step: str, finish_reason: str | None,
              stop_reason: int | str | None, seq: Sequence | None = None,
              confidences: list[float] = ()) -> Branch:
        """The branch made of ``parent`` by one more step (``token_ids``: all of it, prompt
        included; ``finish_reason``/``stop_reason``: how the step's generation ended; ``seq``:
        the parked sequence holding its KV, if any; ``confidences``: of the step's tokens)."""
        cfg = self.config
        branch = Branch(list(token_ids), parent.num_prompt_tokens, [*parent.steps, step],
                        [*parent.step_ends, len(token_ids) - parent.num_prompt_tokens], list(parent.scores),
                        parent.num_scored_steps, seq, parent=parent,
                        confidences=[*parent.confidences, *confidences])
        num_new = len(token_ids) - len(parent.token_ids)
        self.generated_tokens += num_new
        if self.pool is not None:
            self.pool.spent += num_new
        if finish_reason == "stop" and stop_reason != cfg.delimiter:
            branch.finish_reason = "stop"  # end of sequence (or a stop token)
        elif branch.num_answer_tokens >= cfg.max_tokens or (
                finish_reason == "length" and num_new < self.step_limit(parent)):  # the context is full
            branch.finish_reason = "length"
        elif cfg.stop_on_answer and self.extract.marked(branch.text) is not None:
            branch.finish_reason = "answer"
        elif len(branch.steps) >= cfg.max_steps:
            branch.finish_reason = "steps"
        elif cfg.cut_loops and repeats_itself(branch.steps):
            branch.finish_reason = "loop"
        if seq is not None and seq.block_table:
            self.live.add(branch)
        else:
            branch.seq = None
        return branch


