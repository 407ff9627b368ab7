"""Inference-time scaling inside the engine: best-of-N, self-consistency, weighted best-of-N,
reward-guided beam search, particle filtering and particle Gibbs.

Every method has the shape ``method(llm, prompt, budget=..., reward=..., **options)`` and
returns a :class:`ScalingResult`.  Branches share KV blocks through the engine's copy-on-write
fork; see :mod:`infera.scaling.controller`.
"""
from infera.scaling.api import (METHODS, beam_search, best_of_n, particle_filtering, particle_gibbs,
                                self_consistency, solve, weighted_best_of_n)
from infera.scaling.controller import SearchController
from infera.scaling.result import Candidate, ScalingResult
from infera.scaling.rewards import ArithmeticReward, FunctionReward, Reward, SelfJudgeReward, make_reward
from infera.scaling.search import Branch, SearchConfig

__all__ = ["METHODS", "ArithmeticReward", "Branch", "Candidate", "FunctionReward", "Reward", "ScalingResult",
           "SearchConfig", "SearchController", "SelfJudgeReward", "beam_search", "best_of_n", "make_reward",
           "particle_filtering", "particle_gibbs", "self_consistency", "solve", "weighted_best_of_n"]
