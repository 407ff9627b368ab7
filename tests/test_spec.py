"""Speculative decoding is lossless: greedy and seeded outputs equal plain decoding's for every
proposer, alone and in mixed batches, with stops, grammars, n > 1 and preemption; sampling keeps
the target distribution (chi-square test); rollbacks leak no KV block.

The engines here draft as many tokens as allowed at every step (:func:`always_draft`), so that
the tests do not depend on the adaptive controller's choices and rejections happen often."""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from infera import LLM, SamplingParams
from infera.engine.llm_engine import LLMEngine
from infera.engine.sequence import Sequence
from infera.engine.spec_decoder import MAX_IDLE_STEPS
from infera.kernels import load_cpu_extension
from infera.models import llama_native
from infera.sampling_params import StructuredOutputParams as SO
from infera.spec.controller import SpecController, StepCost
from infera.spec.draft_vocab import DraftVocab
from infera.spec.self_draft import parse_layers

METHODS = ["ngram", "recycle", "self", "draft"]
Q_METHODS = {"self", "draft"}  # sampled requests get drafts sampled from a draft distribution q
DRAFT_TOKENS = 4
DRAFT_VOCAB = 64  # speculative_draft_vocab_size in the tests of a cut draft vocabulary
WORDS = "the engine schedules every sequence in blocks while a cache keeps keys and values".split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(llm: LLM, ps: list, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


def assert_idle(engine: LLMEngine) -> None:
    """No request left and every KV block free: nothing leaked through rollbacks."""
    assert not engine.has_unfinished_requests()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def always_draft(engine: LLMEngine) -> None:
    """Make the controller hand out every draft token it may (it still keeps its statistics)."""
    controller = engine.spec.controller
    plan = controller.plan

    def plan_all(seqs, limits, *args) -> list[int]:
        plan(seqs, limits, *args)
        return list(limits)

    controller.plan = plan_all
    if engine.spec.proposer.name == "recycle":
        engine.spec.proposer.min_confidence = 0.0  # a random model's predictions are never confident


def spec_counts(engine: LLMEngine) -> tuple[int, int]:
    """(draft tokens verified, draft tokens accepted) so far."""
    return engine.spec.num_draft_tokens, engine.spec.num_accepted_tokens


@pytest.fixture(scope="module")
def draft_path(tiny_model, tmp_path_factory) -> Path:
    """The tiny target with slightly perturbed weights: a draft model that agrees with it often, not always."""
    target = tiny_model("llama")
    path = tmp_path_factory.mktemp("draft") / "llama"
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    model.save_pretrained(path)
    for f in target.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def make_spec_llm(tiny_model, draft_path: Path, method: str, **options) -> LLM:
    name = f"draft:{draft_path}" if method == "draft" else method
    if method == "self":
        name = "self:1"  # the tiny model has 2 layers: the draft runs layer 0 only
    whole = {"speculative_draft_vocab_size": 0}  # the tests of a cut draft vocabulary say so
    llm = LLM(str(tiny_model("llama")), dtype="float32", speculative=name, num_speculative_tokens=DRAFT_TOKENS,
              **{"kv_cache_memory": "16MiB", **whole, **options})
    always_draft(llm.engine)
    return llm


@pytest.fixture(scope="module")
def spec_llm(tiny_model, draft_path):
    """``spec_llm(method)``: a tiny-model engine speculating with ``method``, shared by this module."""
    cache: dict[str, LLM] = {}

    def get(method: str) -> LLM:
        if method not in cache:
            cache[method] = make_spec_llm(tiny_model, draft_path, method)
        return cache[method]

    return get


# -- greedy and seeded outputs are unchanged ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_greedy_alone_identical(spec_llm, tiny_llm, method):
    llm = spec_llm(method)
    before = spec_counts(llm.engine)
    for p in prompts(3, seed=0):
        assert token_ids(llm, [p], greedy(40)) == token_ids(tiny_llm, [p], greedy(40))
    drafted, accepted = (a - b for a, b in zip(spec_counts(llm.engine), before))
    assert drafted > 0 and (accepted > 0 or method == "self")  # a random model without a layer guesses badly
    assert_idle(llm.engine)


def mixed_batch(plain: LLM) -> tuple[list[str], list[SamplingParams]]:
    """16 requests: prompt lengths 3-60 words, max_tokens 5-40, stop strings that do end some of them,
    stop token ids, logprobs, and seeded sampled requests."""
    ps = prompts(16, seed=2)
    rng = random.Random(3)
    params: list[SamplingParams] = []
    for i, p in enumerate(ps):
        max_tokens = rng.randint(5, 40)
        if i % 4 == 3:
            params.append(SamplingParams(temperature=0.8, top_k=3, seed=i, max_tokens=max_tokens, ignore_eos=True))
            continue
        full = plain.generate([p], greedy(max_tokens), use_tqdm=False)[0].outputs[0]
        if i % 4 == 1:  # a stop string from the middle of the plain output
            middle = len(full.text) // 2
            params.append(greedy(max_tokens, stop=[full.text[middle:middle + 3]]))
        elif i == 2:
            params.append(greedy(max_tokens, stop_token_ids=[full.token_ids[len(full.token_ids) // 2]]))
        else:
            params.append(greedy(max_tokens, logprobs=2 if i == 0 else None))
    return ps, params


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_of_16_identical(spec_llm, tiny_llm, method):
    llm = spec_llm(method)
    ps, params = mixed_batch(tiny_llm)
    expected = tiny_llm.generate(ps, params, use_tqdm=False)
    before = spec_counts(llm.engine)
    got = llm.generate(ps, params, use_tqdm=False)
    assert sum(o.outputs[0].finish_reason == "stop" for o in expected) >= 4  # the stops do stop
    for e, g, p in zip(expected, got, params):
        e, g = e.outputs[0], g.outputs[0]
        if p.greedy or method not in Q_METHODS:  # seeded sampling with deterministic drafts: exact too
            assert (g.token_ids, g.text, g.finish_reason) == (e.token_ids, e.text, e.finish_reason)
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == p.max_tokens
        if p.logprobs:
            for a, b in zip(g.logprobs, e.logprobs):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
    drafted, accepted = (a - b for a, b in zip(spec_counts(llm.engine), before))
    assert drafted > accepted > 0  # both acceptances and rollbacks happened
    assert_idle(llm.engine)


def test_seeded_sampling_identical_with_deterministic_drafts(spec_llm, tiny_llm):
    """n-gram drafts under sampling: each row is sampled as plain decoding samples it and the
    generator is rewound past the rejected rows, so seeded outputs (n=3) do not change."""
    llm = spec_llm("ngram")
    p = " ".join(WORDS * 2)
    params = SamplingParams(n=3, temperature=0.5, top_k=3, seed=11, max_tokens=40, ignore_eos=True)
    before = spec_counts(llm.engine)
    got = llm.generate([p], params, use_tqdm=False)[0].outputs
    expected = tiny_llm.generate([p], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert len({tuple(c.token_ids) for c in got}) == 3
    drafted, accepted = (a - b for a, b in zip(spec_counts(llm.engine), before))
    assert drafted > accepted > 0
    assert_idle(llm.engine)


# -- sampling keeps the target distribution -----------------------------------------------------
CHI2_15DOF_P001 = 37.70  # chi-square critical value, 15 degrees of freedom, p = 0.001


def exact_paths(model_path: Path, prompt: list[int], depth: int, top_k: int) -> dict[tuple[int, ...], float]:
    """Probability of each ``depth``-token continuation under top-k sampling at temperature 1 (HF model)."""
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    paths = {(): 1.0}
    with torch.inference_mode():
        for _ in range(depth):
            grown = {}
            for path, prob in paths.items():
                logits = hf(torch.tensor([prompt + list(path)])).logits[0, -1]
                top = logits.topk(top_k)
                for t, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                    grown[path + (t,)] = prob * q
            paths = grown
    return paths


@pytest.mark.parametrize("method", ["draft", "draft-vocab", "self"])
def test_sampled_distribution_unchanged(tiny_model, draft_path, tiny_llm, method):
    """Drafts sampled from the draft distribution q (draft model, self-draft), accepted with
    probability min(1, p/q), else resampled from norm(max(0, p - q)): the 4-token continuations
    (token 1 plain, tokens 2-3 drafted and verified, token 4 a bonus or resample) of 600 seeded
    samples at top_k=2 (16 outcomes) follow the target's exact probabilities: Pearson's chi-square
    statistic stays below the p = 0.001 critical value (seeded, so the result is deterministic).
    Checked to have power: resampling from p instead of the residual gives 75 for self-drafting.
    draft-vocab: the draft's vocabulary is cut between the outcomes' tokens, so that some have draft
    probability 0 (never drafted, reached only by resampling) and others are drafted."""
    prompt = tiny_llm.tokenizer.encode("the cache keeps keys")
    exact = exact_paths(tiny_model("llama"), prompt, 4, 2)
    cut = {}
    if method == "draft-vocab":
        outcomes = sorted({t for path in exact for t in path} - set(prompt))
        cut = {"speculative_draft_vocab_size": -(-outcomes[len(outcomes) // 2] // 16) * 16}
        assert outcomes[0] < cut["speculative_draft_vocab_size"] <= outcomes[-1]
    llm = make_spec_llm(tiny_model, draft_path, method.removesuffix("-vocab"), max_num_seqs=128, **cut)
    n = 600
    assert min(exact.values()) * n >= 5  # chi-square's approximation holds
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s, max_tokens=4, ignore_eos=True) for s in range(n)]
    counts = Counter(tuple(t) for t in token_ids(llm, [prompt] * n, params))
    assert set(counts) <= set(exact)
    chi2 = sum((counts[path] - n * p) ** 2 / (n * p) for path, p in exact.items())
    assert chi2 < CHI2_15DOF_P001, (chi2, counts)
    drafted, accepted = spec_counts(llm.engine)
    assert drafted > accepted > 0  # both acceptances and residual resamples
    assert_idle(llm.engine)


# -- a draft vocabulary cut to the first ids, the prompts' tokens and EOS ---------------------------
@pytest.mark.parametrize("quantization", [None, "q8_0"])
def test_draft_vocab_logits(draft_path, quantization):
    """The cut head's logits are the draft's own on the kept tokens (the first ids exactly: the same
    kernel on a prefix of the packed tiles; the prompts' tokens from dequantized rows in float, so
    within the int8 activation rounding of the packed head) and -inf on every other token."""
    llm = LLM(str(draft_path), dtype="float32", kv_cache_memory="16MiB", quantization=quantization)
    model, eos = llm.engine.worker.runner.model, llm.engine.worker.tokenizer.eos_token_ids
    prompt = llm.tokenizer.encode(" ".join(WORDS))
    vocab_size = model.config.vocab_size + 5  # a wider target vocabulary: padded with -inf
    cut = DraftVocab(model.lm_head, DRAFT_VOCAB + 7, vocab_size, eos)  # rounded down to the 16-row tile
    cut.prepare([Sequence(prompt, SamplingParams())])
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full, logits = model.compute_logits(hidden).float(), cut.logits(hidden)
    assert logits.shape == (3, vocab_size)
    extra = sorted({t for t in [*prompt, *eos] if t >= DRAFT_VOCAB})
    assert extra and all(t < model.config.vocab_size for t in extra)
    kept = torch.zeros(vocab_size, dtype=torch.bool)
    kept[:DRAFT_VOCAB] = kept[extra] = True
    assert torch.isneginf(logits[:, ~kept]).all()
    torch.testing.assert_close(logits[:, :DRAFT_VOCAB], full[:, :DRAFT_VOCAB], rtol=1e-6, atol=1e-6)
    tol = 0.0 if quantization is None else 0.02 * full.abs().max().item()
    torch.testing.assert_close(logits[:, extra], full[:, extra], rtol=1e-5, atol=tol + 1e-5)


def test_draft_vocab_greedy_identical(tiny_model, draft_path, tiny_llm):
    """With the draft's vocabulary cut (between the tokens plain decoding outputs) plus the prompts'
    tokens, greedy outputs stay plain decoding's, drafts are still accepted, and every drafted token
    is a kept one."""
    ps = prompts(4, seed=3)
    expected = token_ids(tiny_llm, ps, greedy(40))
    prompt_tokens = {t for p in ps for t in tiny_llm.tokenizer.encode(p)}
    outcomes = sorted({t for out in expected for t in out} - prompt_tokens)
    size = -(-outcomes[len(outcomes) // 2] // 16) * 16
    llm = make_spec_llm(tiny_model, draft_path, "draft", speculative_draft_vocab_size=size)
    proposer = llm.engine.spec.proposer
    drafted: list[int] = []
    propose = proposer.propose
    proposer.propose = lambda seqs, k: [drafted.extend(d.token_ids) or d for d in propose(seqs, k)]
    assert token_ids(llm, ps, greedy(40)) == expected
    drafted_count, accepted = spec_counts(llm.engine)
    assert drafted_count > accepted > 0
    kept = set(range(size)) | prompt_tokens | set(llm.engine.worker.tokenizer.eos_token_ids)
    assert drafted and set(drafted) <= kept
    assert_idle(llm.engine)


# -- KV blocks, prefix caching, grammars, n > 1, preemption -------------------------------------
def test_prefix_cache_holds_only_verified_tokens(spec_llm, tiny_llm):
    """After rollbacks, every hashed block holds tokens that the sequences really have at that
    place; a repeated request hits the cache and stays exact."""
    llm = spec_llm("recycle")
    llm.engine.reset_prefix_cache()
    bm = llm.engine.block_manager
    shared = " ".join(WORDS * 3)
    ps = [shared + " " + p for p in prompts(4, seed=4)]
    outs = llm.generate(ps, greedy(40), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == token_ids(tiny_llm, ps, greedy(40))
    assert_idle(llm.engine)
    chunks = set()
    for o in outs:
        tokens = o.prompt_token_ids + o.outputs[0].token_ids
        chunks |= {tuple(tokens[i:i + bm.block_size]) for i in range(0, len(tokens), bm.block_size)}
    cached = [b.token_ids for b in bm.blocks if b.hash is not None]
    assert cached and all(t in chunks for t in cached)
    hits = llm.engine.scheduler.prefix_hits
    assert token_ids(llm, ps[:1], greedy(40)) == [outs[0].outputs[0].token_ids]
    assert llm.engine.scheduler.prefix_hits > hits
    assert_idle(llm.engine)


SCHEMA = {"type": "object", "required": ["name", "tags", "ok"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 6}},
                         "ok": {"type": "boolean"}}}


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_json_schema_valid_and_identical(spec_llm, tiny_llm, method):
    llm = spec_llm(method)
    ps = [f"Reply in JSON: {json.dumps(SCHEMA)} " + p for p in prompts(3, seed=5)]
    params = SamplingParams(temperature=0.0, max_tokens=80, structured=SO(json=SCHEMA))
    before = spec_counts(llm.engine)
    got = llm.generate(ps, params, use_tqdm=False)
    expected = tiny_llm.generate(ps, params, use_tqdm=False)
    for g, e in zip(got, expected):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].finish_reason == "stop", g.outputs[0].text
        jsonschema.validate(json.loads(g.outputs[0].text), SCHEMA)
    if method == "ngram":  # the draft model's unconstrained guesses are rarely valid JSON
        assert spec_counts(llm.engine)[0] > before[0]
    assert_idle(llm.engine)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_identical(tiny_model, draft_path, tiny_llm, method):
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB a block: 8 blocks, 128 tokens
    llm = make_spec_llm(tiny_model, draft_path, method, kv_cache_memory=8 * 8192, max_num_batched_tokens=64)
    ps = prompts(6, seed=6)
    assert token_ids(llm, ps, greedy(40)) == token_ids(tiny_llm, ps, greedy(40))
    assert llm.engine.scheduler.num_preemptions > 0
    drafted, accepted = spec_counts(llm.engine)
    assert drafted > accepted > 0
    assert_idle(llm.engine)


def test_greedy_n_samples(spec_llm, tiny_llm):
    llm = spec_llm("draft")
    p = prompts(1, seed=7)[0]
    params = greedy(30, n=3)
    got = llm.generate([p], params, use_tqdm=False)[0].outputs
    expected = token_ids(tiny_llm, [p], greedy(30))[0]
    assert [c.index for c in got] == [0, 1, 2] and all(c.token_ids == expected for c in got)
    assert_idle(llm.engine)


# -- the controller and options -----------------------------------------------------------------
def test_controller_switches_off_when_drafts_fail():
    """With a step cost that grows with its tokens, a sequence whose drafts are always rejected
    gets no draft tokens after a few steps; one whose drafts are accepted keeps drafting."""

    controller = SpecController(max_tokens=8)
    for tokens in (1, 2, 4, 8, 9, 16):
        controller.step_cost.add(tokens, 0.01 + 0.002 * tokens)
    good, bad = Sequence([1, 2], SamplingParams()), Sequence([1, 2], SamplingParams())
    for _ in range(20):
        ks = controller.plan([good, bad], [8, 8], 2, 2, None)
        controller.update(good, ks[0], ks[0])
        controller.update(bad, ks[1], 0)
    assert ks[0] >= 4 and ks[1] == 0
    # a batch where each draft token costs nearly a full step's worth: speculation turns off
    big = SpecController(max_tokens=8)
    for tokens in (64, 80, 96, 128):
        big.step_cost.add(tokens, 0.0001 + 0.001 * tokens)
    seqs = [Sequence([1, 2], SamplingParams()) for _ in range(64)]
    assert sum(big.plan(seqs, [8] * 64, 64, 64, None)) == 0


def test_self_draft_layers():
    assert parse_layers("", 30) == {16, 18, 20, 22, 24, 26, 28}
    assert parse_layers("", 2) == {1}
    assert parse_layers("1-3,5", 8) == {1, 2, 3, 5}
    for bad in ("0-7", "9", "x"):
        with pytest.raises(ValueError):
            parse_layers(bad, 8)
    with pytest.raises(ValueError, match="at least 2 layers"):
        parse_layers("", 1)


@pytest.mark.skipif(load_cpu_extension() is None, reason="native kernels could not be compiled")
def test_self_drafting_builds_each_native_stack_once(tiny_model, draft_path, monkeypatch):
    """Self-drafting skips layers at every draft pass: the full and the draft layers each get one
    native decode stack, not one per pass."""
    built = []
    build = llama_native.build_stack
    monkeypatch.setattr(llama_native, "build_stack", lambda *args: built.append(1) or build(*args))
    llm = make_spec_llm(tiny_model, draft_path, "self")
    llm.generate([" ".join(WORDS)], greedy(24), use_tqdm=False)
    assert llm.engine.spec.num_drafts > 2, "too few draft passes to tell"
    assert len(built) == 2


@pytest.mark.parametrize("bad", ["medusa", "draft:"])
def test_bad_method_named(tiny_model, bad):
    with pytest.raises(ValueError, match="speculative"):
        LLM(str(tiny_model("llama")), speculative=bad)


class FixedStepCost(StepCost):
    """Step times given by ``seconds(tokens)``, whatever this machine measures."""

    def __init__(self, seconds=lambda tokens: 1.0):  # default: flat, a GPU-like regime
        super().__init__(0.15)
        self.seconds = seconds

    def add(self, tokens: int, seconds: float) -> None:
        pass

    def curve(self, lo: int, hi: int) -> np.ndarray:
        return np.array([self.seconds(t) for t in range(lo, hi + 1)], dtype=np.float64)


def test_stats_and_controller_on(tiny_model):
    """With the adaptive controller (not forced) and steps whose cost does not grow with their
    tokens, n-gram drafts on repetitive output are verified and counted in the engine's stats."""
    llm = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB", speculative="ngram")
    llm.engine.spec.controller.step_cost = FixedStepCost()
    llm.generate([" ".join(WORDS * 2)], greedy(64), use_tqdm=False)
    stats = llm.engine.stats
    assert stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"] > 0
    assert stats["spec_mean_acceptance_length"] > 1 and 0 < stats["spec_acceptance_rate"] <= 1
    assert_idle(llm.engine)


def test_new_sequences_start_from_the_workloads_acceptance():
    """A new sequence's prior is the acceptance of all sequences' recent drafts: where a draft token
    costs 40% of a step (it pays above 40% acceptance), a new sequence drafts on a fresh engine (an
    optimistic prior) and after others' drafts were accepted, not after they were all rejected."""

    def new_sequence_drafts(outcome: int | None) -> int:
        controller = SpecController(max_tokens=4)
        controller.step_cost = FixedStepCost(lambda tokens: 0.010 + 0.004 * (tokens - 1))
        if outcome is not None:
            for _ in range(30):
                controller.update(Sequence([1, 2], SamplingParams()), 4, outcome)
        return controller.plan([Sequence([1, 2], SamplingParams())], [4], 1, 1, None)[0]

    assert new_sequence_drafts(None) > 0 and new_sequence_drafts(4) > 0
    assert new_sequence_drafts(0) == 0


def test_planning_backs_off_while_drafting_does_not_pay(tiny_model):
    """Where each draft token costs a full step, the controller chooses none and is asked again only
    every few steps (backing off up to MAX_IDLE_STEPS); where drafts are free, it plans every step."""
    plans = []
    for seconds in (lambda t: 0.01 * t, lambda t: 1.0):
        llm = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB", speculative="ngram")
        controller = llm.engine.spec.controller
        controller.step_cost = FixedStepCost(seconds)
        calls = []
        plan = controller.plan
        controller.plan = lambda *args: calls.append(plan(*args)) or calls[-1]
        llm.generate([" ".join(WORDS * 2)], greedy(64), use_tqdm=False)
        plans.append(calls)
    costly, free = plans
    assert not any(map(any, costly)) and 3 <= len(costly) <= 64 // MAX_IDLE_STEPS + 4
    assert len(free) > 40 and sum(map(sum, free)) > 0


def test_step_cost_follows_the_local_slope():
    """A convex step cost (flat for a few tokens, 1.5 ms per token in large batches): the marginal
    token is priced from the nearby counts, so a 16-sequence batch with well-accepted drafts gets
    none, while a single sequence still drafts."""

    controller = SpecController(max_tokens=8)
    for _ in range(10):
        for tokens in (1, 2, 3, 4, 5):
            controller.step_cost.add(tokens, 0.010 + 0.0002 * tokens)
        for tokens in (16, 20, 24, 32):
            controller.step_cost.add(tokens, 0.0015 * tokens)
    cost = controller.step_cost
    assert cost(33) - cost(32) > 0.0012 and cost(3) - cost(2) < 0.0005
    batch = [Sequence([1, 2], SamplingParams()) for _ in range(16)]
    for seq in batch:
        controller.update(seq, 8, 7)  # drafts mostly accepted
    assert sum(controller.plan(batch, [8] * 16, 16, 16, None)) == 0
    assert controller.plan(batch[:1], [8], 1, 1, None)[0] > 0


def test_plan_takes_the_best_number_of_draft_tokens_not_the_first_stop():
    """A step cost with a cheaper regime from 32 tokens on (as AMX takes over here): one more token
    than 16 does not pay, sixteen more do, and the controller finds that; below the jump it drafts
    nothing."""

    def seconds(tokens: int) -> float:
        return 0.016 + 0.0015 * (tokens - 16) if tokens < 32 else 0.020 + 0.0006 * (tokens - 32)

    controller = SpecController(max_tokens=8)
    controller.step_cost = FixedStepCost(seconds)
    batch = [Sequence([1, 2], SamplingParams()) for _ in range(16)]
    for seq in batch:
        controller.update(seq, 4, 3)
    ks = controller.plan(batch, [8] * 16, 16, 16, None)
    assert sum(ks) >= 16 and max(ks) - min(ks) <= 1, ks  # the cheaper regime, drafts spread evenly
    for seq in batch:  # rarely accepted: the jump no longer pays
        controller.state(seq).accepted, controller.state(seq).rejected = 0.0, 20.0
    assert sum(controller.plan(batch, [8] * 16, 16, 16, None)) == 0
