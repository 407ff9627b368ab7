"""Adaptive stopping of the sampling methods: each rule, driven by scripted samples, stops exactly
where its definition says; on the engine, a stopped search frees every block."""
from __future__ import annotations

import pytest

from infera.scaling import self_consistency, solve
from infera.scaling.api import build_search
from infera.scaling.problem import Problem
from infera.scaling.sampling import self_consistency as self_consistency_method
from infera.scaling.rewards import Reward
from infera.scaling.search import Expand, Search, SearchConfig, TokenPool, repeats_itself
from infera.scaling.stopping import CONFIDENCE_GROUP, StoppingRule, beta_confidence, group_confidences


class StepChecker(Reward):
    """Scores each new step 0.0 if it contains "bad", else 1.0."""

    def score(self, search, branches):
        return [[0.0 if "bad" in step else 1.0 for step in b.steps[b.num_scored_steps:]] for b in branches]


def run_scripted(script: list[tuple], budget: int, reward: Reward | None = None, pool: TokenPool | None = None,
                 **config) -> tuple[Search, int]:
    """Self-consistency over scripted samples: sample k (in launch order) takes ``script[k][0]``
    steps and then marks ``script[k][1]``; each step is CONFIDENCE_GROUP tokens of confidence
    ``script[k][2]`` (1.0 if not given).  Returns the search and how many samples were launched."""
    s = Search("self_consistency", self_consistency_method, Problem("q", [1, 2, 3]), budget, reward,
               SearchConfig(**config), {})
    s.pool = pool
    index: dict[int, int] = {}  # id(branch) -> its sample
    launched = 0
    ops = s.gen.send(None)
    try:
        while True:
            results = []
            for op in ops:
                assert isinstance(op, Expand)
                children = []
                for _ in range(op.n):
                    if op.branch is s.root:
                        k, launched = launched, launched + 1
                    else:
                        k = index[id(op.branch)]
                    steps, answer, confidence = (*script[k], 1.0)[:3]
                    last = len(op.branch.steps) + 1 == steps
                    text = f"\\boxed{{{answer}}}" if last else f"step {len(op.branch.steps)} "
                    if answer == "loop" and not last:
                        text = "the same step again"
                    elif answer.startswith("bad") and len(op.branch.steps) == 1:
                        text = "a bad step "
                    child = s.child(op.branch, op.branch.token_ids + [7], text, "stop", "\n\n",
                                    confidences=[confidence] * CONFIDENCE_GROUP)
                    index[id(child)] = k
                    children.append(child)
                results.append(children)
            ops = s.gen.send(results)
    except StopIteration as stop:
        s.result = stop.value
    return s, launched


def test_beta_confidence_closed_form():
    assert beta_confidence(4, 0) == pytest.approx(1 - 0.5**5)
    assert beta_confidence(3, 1) == pytest.approx(26 / 32)
    assert beta_confidence(7, 1) == pytest.approx((512 - 10) / 512)
    assert beta_confidence(2, 2) == pytest.approx(0.5)


def test_without_a_rule_every_sample_runs():
    script = [(1, "A"), (2, "B"), (1, "A")]
    s, launched = run_scripted(script, 3)
    assert launched == 3 and len(s.result.candidates) == 3 and s.result.answer == "A"


def test_esc_stops_after_the_first_unanimous_window():
    script = [(1, "A"), (1, "B"), (2, "A"), (1, "A")] + [(1, "A")] * 4 + [(1, "B")] * 8
    s, launched = run_scripted(script, 16, stop="esc", stop_window=4)
    assert launched == 8 and len(s.result.candidates) == 8
    assert s.result.answer == "A" and s.result.answer_scores == {"A": 7, "B": 1}
    full, launched = run_scripted(script[:8], 8)  # the same 8 samples without the rule: the same vote
    assert full.result.answer == "A" and full.result.answer_scores == s.result.answer_scores


def test_esc_runs_the_whole_budget_when_no_window_agrees():
    script = [(1, "A"), (1, "B")] * 4
    s, launched = run_scripted(script, 8, stop="esc", stop_window=2)
    assert launched == 8 and len(s.result.candidates) == 8


def test_beta_stops_online_and_releases_the_running_samples():
    # confidence 0.9: after step 1 two votes for A (P = 0.875), after step 2 five (P = 0.98):
    # stop, although the sixth sample (9 steps) is still running
    script = [(1, "A"), (1, "A"), (2, "A"), (2, "A"), (2, "A"), (9, "B")]
    s, launched = run_scripted(script, 12, stop="beta", stop_window=6, stop_confidence=0.9)
    assert launched == 6 and s.steps == 2
    assert [c.answer for c in s.result.candidates] == ["A"] * 5 and s.result.answer == "A"


def test_beta_launches_another_window_while_undecided():
    script = [(1, "A"), (1, "B"), (1, "A"), (1, "A")] + [(1, "A")] * 4
    s, launched = run_scripted(script, 12, stop="beta", stop_window=4)  # 3:1 (0.81), then 7:1 (0.98)
    assert launched == 8 and s.result.answer_scores == {"A": 7, "B": 1}


def test_short_m_and_first_finish_stop_at_the_first_finished():
    script = [(3, "A"), (1, "B"), (4, "A"), (2, "B"), (5, "A")]
    s, launched = run_scripted(script, 5, stop="short_m", stop_m=2)
    assert launched == 5 and s.steps == 2 and s.result.answer == "B" and len(s.result.candidates) == 2
    s, _ = run_scripted(script, 5, stop="first_finish")
    assert s.steps == 1 and [c.answer for c in s.result.candidates] == ["B"]


def test_deepconf_drops_samples_below_the_warm_up_threshold_and_votes_by_confidence():
    # warm-up (4, run in full): A 5, B 4, A 3, B 2 -> keep 0.5: threshold 4; A 8 vs B 6 (57%): go on.
    # Then the other 8 at once: the four at confidence 1 are dropped after their first step, the four
    # at 6 finish A at step 2: A 32 vs B 6 (84% < 95%), the budget is spent.
    warm = [(1, "A", 5.0), (1, "B", 4.0), (1, "A", 3.0), (1, "B", 2.0)]
    rest = [(2, "A", 6.0)] * 4 + [(3, "B", 1.0)] * 4
    s, launched = run_scripted(warm + rest, 12, stop="deepconf", stop_window=4, stop_keep=0.5)
    assert launched == 12 and len(s.result.candidates) == 8 and s.result.answer == "A"
    assert s.result.answer_scores == {"A": 32.0, "B": 6.0}


def test_deepconf_stops_at_consensus():
    # warm-up: A 5 + 4 + 3 vs B 1 (92%); then the first of the rest finishes A at 9: 21 / 22 >= 95%
    warm = [(1, "A", 5.0), (1, "A", 4.0), (1, "A", 3.0), (1, "B", 1.0)]
    rest = [(1, "A", 9.0)] + [(5, "B", 9.0)] * 3
    s, launched = run_scripted(warm + rest, 8, stop="deepconf", stop_window=4)
    assert launched == 8 and s.steps == 2 and len(s.result.candidates) == 5 and s.result.answer == "A"


def test_early_rejection_ends_a_sample_at_its_bad_step():
    script = [(3, "A"), (4, "bad B"), (3, "A"), (4, "bad B")]
    s, launched = run_scripted(script, 4, StepChecker(), reject_below=0.5)
    assert launched == 4 and s.steps == 3  # the two bad ones end at their second step, not their fourth
    assert [c.answer for c in s.result.candidates] == ["A", "A"] and s.result.answer == "A"
    full, _ = run_scripted(script, 4, StepChecker())
    assert full.steps == 4 and len(full.result.candidates) == 4
    assert full.generated_tokens > s.generated_tokens


def test_a_sample_repeating_its_step_is_cut():
    s, _ = run_scripted([(9, "loop"), (2, "A")], 2)
    loop, answer = s.result.candidates
    assert loop.finish_reason == "loop" and len(loop.steps) == 2 and answer.answer == "A"
    s, _ = run_scripted([(3, "loop"), (2, "A")], 2, cut_loops=False)
    assert s.result.candidates[0].finish_reason == "answer" and len(s.result.candidates[0].steps) == 3
    assert repeats_itself(["a", "xy", "b", "xy "]) and not repeats_itself(["x", "y", "x"])


def test_a_spent_token_pool_stops_once_a_sample_has_finished():
    # one token a step: after step 2 the pool (limit 5) holds 8, but nothing has finished; step 3
    # finishes the first sample and the search stops there
    script = [(3, "A"), (6, "B"), (6, "B"), (6, "B")]
    pool = TokenPool(5)
    s, _ = run_scripted(script, 4, pool=pool)
    assert s.steps == 3 and pool.spent == 12 and [c.answer for c in s.result.candidates] == ["A"]
    with pytest.raises(ValueError, match="token_budget"):
        TokenPool(0)


def test_a_rule_sets_how_many_samples_run_at_once():
    # the controller admits problems by it: windows of 8 leave room for four times as many problems
    assert StoppingRule.make("esc", 8).width(32) == 8 and StoppingRule.make("beta").width(2) == 2
    assert StoppingRule.make("deepconf", 8).width(32) == 24 and StoppingRule.make("deepconf", 8).width(12) == 8
    assert StoppingRule.make("short_m", m=2).width(32) == 32


def test_group_confidences_slide():
    values = [1.0] * CONFIDENCE_GROUP + [3.0]
    assert group_confidences(values) == [1.0, 1.0 + 2.0 / CONFIDENCE_GROUP]
    assert group_confidences([2.0, 4.0]) == [3.0] and group_confidences([]) == []


@pytest.mark.parametrize("options, message", [
    (dict(stop="vote"), "stop must be one of"),
    (dict(stop_window=4), "need a stop rule"),
    (dict(stop="esc", stop_window=0), "stop_window"),
    (dict(stop="beta", stop_confidence=0.4), "stop_confidence"),
    (dict(stop="short_m", stop_window=4), "whole budget"),
    (dict(stop="first_finish", stop_m=2), "short_m"),
    (dict(stop="esc", stop_m=2), "stop_m applies"),
    (dict(stop="beta", stop_keep=0.5), "stop_keep applies to deepconf"),
    (dict(stop="deepconf", stop_keep=0), "stop_keep"),
])
def test_bad_stopping_options(options, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**options)


def test_stop_is_refused_for_search_methods(tiny_llm):
    with pytest.raises(ValueError, match="sampling methods"):
        build_search(tiny_llm.engine, "What is 2 + 3?", "beam_search", 4, "arithmetic", {"stop": "esc"})
    with pytest.raises(ValueError, match="reject_below applies to the sampling methods"):
        build_search(tiny_llm.engine, "What is 2 + 3?", "beam_search", 4, "arithmetic", {"reject_below": 0.5})
    with pytest.raises(ValueError, match="needs a reward"):
        build_search(tiny_llm.engine, "What is 2 + 3?", "self_consistency", 4, None, {"reject_below": 0.5})
    assert StoppingRule.make(None) is None


def test_a_stopped_search_frees_every_block(tiny_llm):
    # random text marks an "answer" (a character of the pattern) at a random 2-token step; with the
    # same seed the samples are the same, and first_finish keeps those that finished first
    engine = tiny_llm.engine
    options = dict(budget=6, step_max_tokens=2, max_tokens=40, seed=0, answer_pattern=r"([0-9a-e])")
    full = self_consistency(tiny_llm, "What is 2 + 3?", **options)
    stopped = self_consistency(tiny_llm, "What is 2 + 3?", stop="first_finish", **options)
    first = min(len(c.steps) for c in full.candidates)
    assert stopped.steps == first and len(full.candidates) == 6
    assert [c.text for c in stopped.candidates] == [c.text for c in full.candidates if len(c.steps) == first]
    assert stopped.generated_tokens <= full.generated_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.requests


def test_deepconf_on_the_engine_reads_token_confidences(tiny_llm):
    engine = tiny_llm.engine
    result = self_consistency(tiny_llm, "What is 2 + 3?", budget=4, step_max_tokens=4, max_tokens=12, seed=1,
                              stop="deepconf", stop_window=2)
    assert 1 <= len(result.candidates) <= 4
    assert all(c.confidence is not None and c.confidence > 0 for c in result.candidates)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.requests


def test_problems_share_a_token_budget(tiny_llm):
    prompts = ["What is 2 + 3?", "What is 4 + 4?", "What is 7 - 5?"]
    # a budget the first step of any problem spends: each stops once one of its samples has finished
    options = dict(budget=6, step_max_tokens=2, max_tokens=40, seed=0, answer_pattern=r"([0-9a-e])")
    full = solve(tiny_llm, prompts, "self_consistency", **options)
    capped = solve(tiny_llm, prompts, "self_consistency", token_budget=4, **options)
    for f, c in zip(full, capped):
        first = min(len(x.steps) for x in f.candidates)
        assert [x.text for x in c.candidates] == [x.text for x in f.candidates if len(x.steps) == first]
        assert c.generated_tokens <= f.generated_tokens
    with pytest.raises(ValueError, match="sampling methods"):
        solve(tiny_llm, prompts, "beam_search", reward="arithmetic", token_budget=20, **options)
    engine = tiny_llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.requests


def test_replay_of_a_full_run_stops_where_each_rule_says():
    """benchmarks/stopping_tune.py replays recorded samples: windows in launch order, each window's
    samples finishing shortest first, the running ones charged up to the stopping sample."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.stopping_tune import Sample, replay

    samples = [Sample(a, t, None) for a, t in zip("abaaca", (10, 20, 30, 40, 50, 60))]
    sc = {"self_consistency": "a", "weighted_best_of_n": "a"}  # (no scores: the weighted vote ties on weight 0)
    assert replay(samples, None, 6) == (sc, 210)
    assert replay(samples, StoppingRule.make("esc", window=2), 6) == (sc, 10 + 20 + 30 + 40)
    # beta(1 vote, 0) = 0.75 >= 0.6: stops at the first finished sample, 3 others running 10 tokens each
    assert replay(samples, StoppingRule.make("beta", window=4, confidence=0.6), 6) == (sc, 10 + 3 * 10)
    # short_m: the whole budget at once, stop at the second finished; a 1-1 tie goes to the first launched
    assert replay(samples, StoppingRule.make("short_m", m=2), 6) == (sc, 10 + 20 + 4 * 20)
    scored = [Sample(a, 10, s) for a, s in (("a", 0.1), ("b", 0.9), ("a", 0.2))]
    assert replay(scored, None, 3) == ({"self_consistency": "a", "weighted_best_of_n": "b"}, 30)
