"""The Python API: ``method(llm, prompt, budget=..., reward=..., **options)`` for every method,
and :func:`solve` for many prompts at once (their branches batched together)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm

from infera.engine.llm_engine import LLMEngine
from infera.scaling.beam_search import beam_search as _beam_search
from infera.scaling.controller import SearchController
from infera.scaling.search import Search, SearchConfig, SearchGen, TokenPool
from infera.scaling.particle_filtering import particle_filtering as _particle_filtering
from infera.scaling.particle_filtering import particle_gibbs as _particle_gibbs
from infera.scaling.problem import DEFAULT_INSTRUCTION, PROMPT_OPTIONS, Prompt, check_examples, make_problem
from infera.scaling.result import ScalingResult
from infera.scaling.rewards import Reward, make_reward
from infera.scaling.sampling import PICKS
from infera.scaling.sampling import best_of_n as _best_of_n
from infera.scaling.sampling import self_consistency as _self_consistency
from infera.scaling.sampling import weighted_best_of_n as _weighted_best_of_n

METHODS: dict[str, Callable[..., SearchGen]] = {
    "best_of_n": _best_of_n, "self_consistency": _self_consistency, "weighted_best_of_n": _weighted_best_of_n,
    "beam_search": _beam_search, "particle_filtering": _particle_filtering, "particle_gibbs": _particle_gibbs,
}
NO_REWARD_NEEDED = ("self_consistency",)
RewardSpec = Reward | Callable | str | None


def engine_of(llm: Any) -> LLMEngine:
    engine = getattr(llm, "engine", llm)
    if not isinstance(engine, LLMEngine):
        raise TypeError(f"expected an infera LLM or LLMEngine, got {type(llm).__name__}")
    return engine


def build_search(engine: LLMEngine, prompt: Prompt, method: str, budget: int, reward: RewardSpec,
                 options: dict[str, Any], answer: str | None = None,
                 algorithm: Callable[..., SearchGen] | None = None, rendered: list[int] | None = None) -> Search:
    """A search, its options checked: ValueError names an unknown method, option or reward.
    ``rendered``: the token ids of ``prompt`` (chat messages) when the caller rendered them."""
    if algorithm is None:
        if method not in METHODS:
            raise ValueError(f"unknown scaling method {method!r}; choose from {', '.join(METHODS)}")
        algorithm = METHODS[method]
    reward = make_reward(reward)
    if reward is None and method not in NO_REWARD_NEEDED:
        raise ValueError(f"{method} needs a reward: arithmetic, self, model:PATH or a Python callable")
    config_names = {f.name for f in fields(SearchConfig)}
    method_names = set(inspect.signature(algorithm).parameters) - {"s"}
    options = dict(options)
    instruction = options.pop("instruction", DEFAULT_INSTRUCTION)
    examples = check_examples(options.pop("examples", []))
    unknown = sorted(set(options) - config_names - method_names)
    if unknown:
        known = sorted(config_names | method_names | set(PROMPT_OPTIONS))
        raise ValueError(f"unknown option(s) for {method}: {', '.join(unknown)}; known: {', '.join(known)}")
    config = SearchConfig(**{k: v for k, v in options.items() if k in config_names})
    for name in ("stop", "reject_below"):
        if getattr(config, name) is not None and method not in PICKS:
            raise ValueError(f"{name} applies to the sampling methods ({', '.join(PICKS)}), not {method}")
    if config.reject_below is not None and reward is None:
        raise ValueError("reject_below needs a reward that scores steps (arithmetic, self, model:PATH)")
    problem = make_problem(engine.tokenizer, prompt, instruction, answer, examples, rendered)
    engine.check_prompt_length(len(problem.prompt_ids))
    return Search(method, algorithm, problem, budget, reward, config,
                  {k: v for k, v in options.items() if k in method_names})


def run_searches(engine: LLMEngine, searches: list[Search], use_tqdm: bool = False,
                 desc: str = "scaling") -> list[Search]:
    """Run ``searches`` together on ``engine``; raise the first failure."""
    bar = tqdm(total=len(searches), desc=desc, unit="problem", disable=not use_tqdm, dynamic_ncols=True)
    try:
        SearchController(engine).run(searches, lambda s: bar.update(1))
    finally:
        bar.close()
    for s in searches:
        if s.error is not None:
            raise s.error
    return searches


def solve(llm: Any, prompts: Sequence[Prompt], method: str, budget: int = 8, reward: RewardSpec = None,
          use_tqdm: bool = False, token_budget: int | None = None, **options: Any) -> list[ScalingResult]:
    """Run ``method`` on every prompt at once: all their branches share the engine's batches.
    ``token_budget`` (sampling methods): the generated tokens all problems may spend together (see
    :class:`TokenPool`); ``budget`` stays each problem's most samples."""
    engine = engine_of(llm)
    searches = [build_search(engine, p, method, budget, reward, options) for p in prompts]
    if token_budget is not None:
        if method not in PICKS:
            raise ValueError(f"token_budget applies to the sampling methods ({', '.join(PICKS)}), not {method}")
        pool = TokenPool(token_budget)
        for s in searches:
            s.pool = pool
    return [s.result for s in run_searches(engine, searches, use_tqdm, method)]


def best_of_n(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
              **options: Any) -> ScalingResult:
    """``budget`` samples; the one with the highest reward wins."""
    return solve(llm, [prompt], "best_of_n", budget, reward, **options)[0]


def self_consistency(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
                     **options: Any) -> ScalingResult:
    """``budget`` samples; the most frequent answer wins (a reward, if given, only scores them)."""
    return solve(llm, [prompt], "self_consistency", budget, reward, **options)[0]


def weighted_best_of_n(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
                       **options: Any) -> ScalingResult:
    """``budget`` samples; the answer with the largest summed reward wins."""
    return solve(llm, [prompt], "weighted_best_of_n", budget, reward, **options)[0]


def beam_search(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
                **options: Any) -> ScalingResult:
    """Step-level beam search: ``budget`` beams per step, the ``beam_width`` best kept."""
    return solve(llm, [prompt], "beam_search", budget, reward, **options)[0]


def particle_filtering(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
                       **options: Any) -> ScalingResult:
    """Particle filtering with ``budget`` particles resampled after every step."""
    return solve(llm, [prompt], "particle_filtering", budget, reward, **options)[0]


def particle_gibbs(llm: Any, prompt: Prompt, budget: int = 8, reward: RewardSpec = None,
                   **options: Any) -> ScalingResult:
    """Particle Gibbs: ``iterations`` particle filters sharing ``budget``, with a reference particle."""
    return solve(llm, [prompt], "particle_gibbs", budget, reward, **options)[0]
