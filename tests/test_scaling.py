"""Scaling methods end to end on the tiny random Llama with scripted, deterministic rewards:
what each method chooses, KV sharing between branches, and no block leaks."""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import pytest

from infera import LLM, SamplingParams
from infera.scaling import (METHODS, Reward, beam_search, best_of_n, particle_filtering, self_consistency, solve,
                            weighted_best_of_n)
from infera.scaling.answers import group_answers
from infera.scaling.api import build_search
from infera.scaling.controller import SearchController
from infera.scaling.problem import judge_suffix, make_problem

STEPS = dict(step_max_tokens=3, max_tokens=9, seed=1)  # random text: steps end by length, 3 steps


def fraction(text: str) -> float:
    """A deterministic score in [0, 1) for any text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def outcome(question: str, steps: list[str]) -> float:
    return fraction("".join(steps))


def process(question: str, steps: list[str]) -> list[float]:
    return [fraction(s) for s in steps]


def assert_idle(engine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


@pytest.fixture(scope="module")
def cold_llm(tiny_model):
    """The tiny Llama without a prefix cache: every computed prompt token is counted exactly."""
    return LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="32MiB", enable_prefix_caching=False)


def test_retained_sequence_is_continued_without_recompute(cold_llm):
    engine = cold_llm.engine
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks + 8
    rid = engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), retain=True)
    req = engine.requests[rid]
    while engine.has_unfinished_requests():
        engine.step()
    parent = req.seqs[0]
    assert parent.is_finished and len(parent.block_table) == 3 and parent.num_computed_tokens == 44
    before = engine.num_prompt_tokens
    cid = engine.add_request(parent.token_ids, SamplingParams(n=3, max_tokens=2, temperature=0, ignore_eos=True),
                             parent=parent)
    children = engine.requests[cid].seqs
    bm = engine.block_manager
    assert all(c.block_table == parent.block_table for c in children)
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [4, 4, 4]  # the parent and three children
    engine.release(parent)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_prompt_tokens - before == 3  # only each child's held last token, not 44 shared ones
    assert [c.output_token_ids for c in children] == [children[0].output_token_ids] * 3
    # greedy continuation of the parent equals generating all 7 tokens at once
    whole = cold_llm.generate(prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), use_tqdm=False)
    assert parent.output_token_ids + children[0].output_token_ids == whole[0].outputs[0].token_ids
    assert_idle(engine)


def test_parent_prompt_may_diverge(cold_llm):
    """A judge-style request: the parent's tokens, then other tokens; only those are computed."""
    engine = cold_llm.engine
    rid = engine.add_request(list(range(200, 233)), SamplingParams(max_tokens=1, temperature=0), retain=True)
    req = engine.requests[rid]
    while engine.has_unfinished_requests():
        engine.step()
    parent = req.seqs[0]
    before = engine.num_prompt_tokens
    jid = engine.add_request(parent.token_ids[:-1] + [5, 6, 7], SamplingParams(max_tokens=1, temperature=0),
                             parent=parent)
    judge = engine.requests[jid]
    while engine.has_unfinished_requests():
        engine.step()
    assert judge.num_computed_prompt_tokens == engine.num_prompt_tokens - before == 3
    engine.release(parent)
    assert_idle(engine)


def test_best_of_n_picks_the_max(tiny_llm):
    result = best_of_n(tiny_llm, "What is 2 + 2?", budget=6, reward=outcome, **STEPS)
    assert len(result.candidates) == 6
    scores = [c.score for c in result.candidates]
    assert scores == [outcome("", [c.text]) for c in result.candidates]
    assert result.text == result.candidates[scores.index(max(scores))].text
    assert result.generated_tokens == sum(c.num_tokens for c in result.candidates)
    assert_idle(tiny_llm.engine)


def test_self_consistency_picks_the_mode(tiny_llm):
    # the first character of the solution as its "answer": random text repeats them
    result = self_consistency(tiny_llm, "What is 2 + 2?", budget=12, answer_pattern=r"^\s*(\S)", **STEPS)
    answers = [c.answer for c in result.candidates]
    groups = [g for g in group_answers(answers) if answers[g[0]] is not None]  # math-verify: "P" == "p"
    assert result.answer_scores == {answers[g[0]]: float(len(g)) for g in groups}
    mode = max(groups, key=len)  # the first of the largest groups
    assert len(mode) > 1 and result.answer == answers[mode[0]] and result.text == result.candidates[mode[0]].text
    assert_idle(tiny_llm.engine)


def test_weighted_best_of_n_sums_rewards_per_answer(tiny_llm):
    result = weighted_best_of_n(tiny_llm, "What is 2 + 2?", budget=12, reward=outcome, answer_pattern=r"^\s*(\S)",
                                **STEPS)
    answers = [c.answer for c in result.candidates]
    totals = {answers[g[0]]: sum(result.candidates[i].score for i in g) for g in group_answers(answers)}
    assert result.answer_scores == pytest.approx(totals)
    assert result.answer == max(totals, key=totals.get)
    best_in_group = max((c for c in result.candidates if c.answer == result.answer), key=lambda c: c.score)
    assert result.text == best_in_group.text
    assert_idle(tiny_llm.engine)


def test_beam_search_keeps_the_top_beams(tiny_llm):
    seen: list[list[str]] = []

    def recording(question: str, steps: list[str]) -> list[float]:
        seen.append(list(steps))
        return process(question, steps)

    result = beam_search(tiny_llm, "What is 2 + 2?", budget=8, reward=recording, beam_width=2, select="argmax",
                         **STEPS)
    first = [s[0] for s in seen if len(s) == 1]
    assert len(first) == 8  # the first step of every beam was scored
    top2 = sorted(first, key=fraction, reverse=True)[:2]
    second = [s for s in seen if len(s) == 2]
    assert len(second) == 8 and {s[0] for s in second} <= set(top2)  # 2 beams x 4 children
    assert Counter(s[0] for s in second) == {t: 4 for t in top2}
    third = [s for s in seen if len(s) == 3]
    top2_second = sorted(second, key=lambda s: fraction(s[1]), reverse=True)[:2]  # aggregate "last"
    assert len(third) == 8 and {tuple(s[:2]) for s in third} <= {tuple(t) for t in top2_second}
    assert result.text == max(result.candidates, key=lambda c: c.score).text
    assert_idle(tiny_llm.engine)


def test_beam_search_votes_by_summed_reward(tiny_llm):
    result = beam_search(tiny_llm, "What is 2 + 2?", budget=8, reward=outcome, answer_pattern=r"^\s*(\S)", **STEPS)
    answers = [c.answer for c in result.candidates]
    totals = {answers[g[0]]: sum(result.candidates[i].score for i in g) for g in group_answers(answers)}
    assert result.answer_scores == pytest.approx(totals) and result.answer == max(totals, key=totals.get)
    with pytest.raises(ValueError, match="select must be one of argmax, vote"):
        beam_search(tiny_llm, "q", reward=outcome, select="best")
    assert_idle(tiny_llm.engine)


def test_particle_filtering_resamples_in_proportion_to_weights(tiny_llm):
    """16 problems x 12 particles; first-step rewards 0.2 / 0.5 / 0.8 by hash, so resampling
    weights are proportional to the odds 1/4 : 1 : 4.  The children of each class are counted
    against their expectation with a chi-square test (fixed seeds; 13.8 is the p = 0.001
    critical value for 2 degrees of freedom)."""
    levels = (0.2, 0.5, 0.8)
    first_steps: dict[str, list[str]] = defaultdict(list)

    def reward(question: str, steps: list[str]) -> float:
        if len(steps) == 1:
            first_steps[question].append(steps[0])
        return levels[int(fraction(steps[0]) * 3)]

    questions = [f"Problem {i}: what is {i} + {i}?" for i in range(16)]
    results = solve(tiny_llm, questions, "particle_filtering", budget=12, reward=reward,
                    step_max_tokens=3, max_tokens=6, max_steps=2, seed=5)
    observed, expected = Counter(), Counter()
    for q, result in zip(questions, results):
        parents = first_steps[q]
        assert len(parents) == 12 and len(set(parents)) == 12
        odds = [levels[int(fraction(p) * 3)] / (1 - levels[int(fraction(p) * 3)]) for p in parents]
        for p, o in zip(parents, odds):
            expected[levels[int(fraction(p) * 3)]] += 12 * o / sum(odds)
        assert len(result.candidates) == 12
        for c in result.candidates:
            parent = next(p for p in parents if c.text.startswith(p))
            observed[levels[int(fraction(parent) * 3)]] += 1
    chi2 = sum((observed[k] - expected[k]) ** 2 / expected[k] for k in levels)
    assert chi2 < 13.8, (observed, expected)
    assert observed[0.8] > observed[0.2]
    assert_idle(tiny_llm.engine)


def test_particles_share_the_prompt_blocks_and_prefill_it_once(cold_llm):
    engine = cold_llm.engine
    shared: list[tuple[int, int, int]] = []

    class Probe(Reward):
        """Scores 0.5; records, for the live branches, how many share the first KV block."""

        def score(self, search, branches):
            live = [b.seq for b in branches if b.seq is not None and b.seq.block_table]
            first = {s.block_table[0] for s in live}
            shared.append((len(live), len(first), engine.block_manager.blocks[live[0].block_table[0]].ref_count))
            return [[0.5] for _ in branches]

    prompt_len = len(make_problem(engine.tokenizer, "What is 2 + 2?").prompt_ids)
    before = engine.num_prompt_tokens
    result = particle_filtering(cold_llm, "What is 2 + 2?", budget=6, reward=Probe(), **STEPS)
    assert shared and all(n == 6 and blocks == 1 and refs >= 6 for n, blocks, refs in shared)
    # prompt once (the last token once per particle, as for n > 1), then one held token per continued particle
    assert result.prefill_tokens == engine.num_prompt_tokens - before == prompt_len - 1 + 6 + 2 * 6
    assert result.cached_tokens > 6 * prompt_len
    assert_idle(engine)


def test_self_judging_prefills_only_the_question(cold_llm):
    engine = cold_llm.engine
    problem = make_problem(engine.tokenizer, "What is 2 + 2?")
    question = len(judge_suffix(engine.tokenizer, problem))
    result = particle_filtering(cold_llm, "What is 2 + 2?", budget=4, reward="self", **STEPS)
    assert result.judge_passes == 4 * 3
    generation = len(problem.prompt_ids) - 1 + 4 + 2 * 4
    assert result.prefill_tokens == generation + result.judge_passes * (question + 1)
    assert all(len(c.step_scores) == 3 and all(0 <= s <= 1 for s in c.step_scores) for c in result.candidates)
    assert_idle(engine)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_many_problems_without_leaks(tiny_llm, method):
    reward = None if method == "self_consistency" else process
    results = solve(tiny_llm, ["What is 1 + 1?", "What is 2 + 3?", "What is 4 - 1?"], method, budget=4,
                    reward=reward, **STEPS)
    assert len(results) == 3
    for r in results:
        assert r.method == method and r.budget == 4 and r.candidates and r.generated_tokens > 0
        assert r.text in [c.text for c in r.candidates]
    assert_idle(tiny_llm.engine)


def test_bad_requests_raise_value_errors(tiny_llm):
    with pytest.raises(ValueError, match="unknown scaling method 'mcts'"):
        solve(tiny_llm, ["q"], "mcts", 4, outcome)
    with pytest.raises(ValueError, match="budget must be an integer >= 1"):
        best_of_n(tiny_llm, "q", budget=0, reward=outcome)
    with pytest.raises(ValueError, match="unknown reward source 'oracle'"):
        best_of_n(tiny_llm, "q", reward="oracle")
    with pytest.raises(ValueError, match="best_of_n needs a reward"):
        best_of_n(tiny_llm, "q")
    with pytest.raises(ValueError, match="unknown option.*beam_widht"):
        beam_search(tiny_llm, "q", reward=outcome, beam_widht=2)
    with pytest.raises(ValueError, match="beam_width must be an integer in"):
        beam_search(tiny_llm, "q", budget=4, reward=outcome, beam_width=8, **STEPS)
    with pytest.raises(ValueError, match="rewards must be in"):
        best_of_n(tiny_llm, "q", budget=2, reward=lambda q, s: 3.0, **STEPS)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        best_of_n(tiny_llm, "q", reward=outcome, max_tokens=0)
    with pytest.raises(ValueError, match="aggregate must be one of last, min, product"):
        best_of_n(tiny_llm, "q", reward=outcome, aggregate="mean")
    with pytest.raises(ValueError, match="examples must be a list of"):
        best_of_n(tiny_llm, "q", reward=outcome, examples=[("only a question",)])
    with pytest.raises(ValueError, match="with chat messages, put them in the messages"):
        best_of_n(tiny_llm, [{"role": "user", "content": "q"}], reward=outcome, examples=[("q", "a")])
    assert_idle(tiny_llm.engine)


def test_worked_examples_come_before_the_question(tiny_llm):
    tokenizer = tiny_llm.engine.tokenizer
    problem = make_problem(tokenizer, "What is 5 + 4?", "Box it.", examples=[("What is 1 + 1?", "1 + 1 = 2. \\boxed{2}")])
    assert problem.question == "What is 5 + 4?"
    assert problem.messages == [{"role": "user", "content": "What is 1 + 1?\n\nBox it."},
                                {"role": "assistant", "content": "1 + 1 = 2. \\boxed{2}"},
                                {"role": "user", "content": "What is 5 + 4?\n\nBox it."}]
    assert problem.prompt_ids == tokenizer.apply_chat_template(problem.messages)
    options = dict(STEPS, instruction="Box it.", examples=[["What is 1 + 1?", "1 + 1 = 2. \\boxed{2}"]])  # as JSON
    search = build_search(tiny_llm.engine, "What is 5 + 4?", "best_of_n", 2, outcome, options)
    assert search.problem == problem


def test_a_search_whose_requests_are_aborted_fails_and_frees_everything(tiny_llm):
    """As after a failed engine step in the server, where every request is aborted."""
    engine = tiny_llm.engine
    search = build_search(engine, "What is 2 + 2?", "particle_filtering", 3, outcome, STEPS)
    controller = SearchController(engine)
    done: list = []
    engine.drivers.append(controller)
    try:
        controller.submit(search, done.append)
        for _ in range(3):
            engine.step()
        for rid in list(engine.requests):
            engine.abort_request(rid)
        engine.step()
    finally:
        engine.drivers.remove(controller)
    assert done == [search] and "aborted" in str(search.error)
    assert not engine.has_unfinished_requests()
    assert_idle(engine)
