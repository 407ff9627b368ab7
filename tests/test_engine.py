"""End-to-end engine behaviour: batching, chunking, prefix caching and preemption are lossless;
n > 1 shares the prompt; stops, aborts and errors behave."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from infera import LLM, SamplingParams
from infera.engine.llm_engine import LLMEngine

WORDS = ("the engine schedules every sequence in blocks while a cache keeps keys and values for later "
         "tokens so that prefill and decode share one batch of work across many requests today").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def texts(llm: LLM, ps: list[str], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


@pytest.fixture(scope="module")
def bundled(bundled_model_path) -> LLM:
    return LLM(str(bundled_model_path), dtype="float32", kv_cache_memory="512MiB")


@pytest.fixture(scope="module")
def reference(bundled) -> dict[str, list[int]]:
    """32 mixed-length prompts run as one batch (the tests below compare other runs to it)."""
    ps = prompts(32)
    batch = dict(zip(ps, texts(bundled, ps, greedy())))
    assert_idle(bundled.engine)
    return batch


def test_batch_of_32_identical_to_alone(bundled, reference):
    for p in list(reference)[:6]:
        assert texts(bundled, [p], greedy()) == [reference[p]]


def test_chunked_prefill_identical(bundled, reference):
    sched = bundled.engine.scheduler
    sched.max_num_batched_tokens = 16
    try:
        ps = list(reference)[:12]
        assert texts(bundled, ps, greedy()) == [reference[p] for p in ps]
    finally:
        sched.max_num_batched_tokens = bundled.engine.config.max_num_batched_tokens


def test_prefix_cache_hit_identical(bundled, reference):
    p = max(reference, key=len)
    hits = bundled.engine.scheduler.prefix_hits
    assert texts(bundled, [p], greedy()) == [reference[p]]
    assert bundled.engine.scheduler.prefix_hits > hits
    # a longer prompt sharing the prefix also hits and stays exact
    longer = p + " and more"
    expected = texts(bundled, [longer], greedy())
    bundled.engine.block_manager.enable_prefix_caching = False
    try:
        assert texts(bundled, [longer], greedy()) == expected
    finally:
        bundled.engine.block_manager.enable_prefix_caching = True


def test_preemption_identical(bundled_model_path, reference):
    # 30 layers x 2 x 3 heads x 64 x 4 bytes = 46 KiB per token: 8 MiB holds ~11 blocks of 16 tokens
    llm = LLM(str(bundled_model_path), dtype="float32", kv_cache_memory="8MiB", max_model_len=160)
    ps = list(reference)[:16]
    assert texts(llm, ps, greedy()) == [reference[p] for p in ps]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm.engine)


def test_seeded_sampling_independent_of_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = texts(tiny_llm, ["a seeded request"], params)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True) for _ in range(7)]
    outs = tiny_llm.generate(prompts(7, seed=5) + ["a seeded request"], others + [params], use_tqdm=False)
    assert outs[-1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=4321, ignore_eos=True)
    assert texts(tiny_llm, ["a seeded request"], other_seed)[0] != alone


def test_n_samples_share_prompt_blocks(tiny_llm):
    engine = tiny_llm.engine
    prompt = " ".join(WORDS * 2)  # several full blocks
    n_prompt = len(engine.tokenizer.encode(prompt))
    before = engine.num_prompt_tokens
    engine.add_request(prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True), "n4")
    shared_seen = False
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        req = engine.requests.get("n4")
        if req and len(req.seqs) == 4:
            first_blocks = {s.block_table[0] for s in req.seqs}
            shared_seen |= len(first_blocks) == 1 and engine.block_manager.blocks[first_blocks.pop()].ref_count >= 4
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    assert [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 5 for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1  # seeded per sample, not copies
    assert shared_seen
    # the prompt is computed once (all but its last token), then its last token once per sample
    assert engine.num_prompt_tokens - before == n_prompt - 1 + 4
    assert_idle(engine)


def test_abort_frees_blocks(tiny_llm):
    engine = tiny_llm.engine
    for i, p in enumerate(prompts(6, seed=3)):
        engine.add_request(p, greedy(max_tokens=50), f"abort-{i}")
    engine.step()
    engine.step()
    for i in range(6):
        engine.abort_request(f"abort-{i}")
    assert_idle(engine)


def test_stop_strings_and_tokens(tiny_llm):
    base = texts(tiny_llm, ["stop here please"], greedy(max_tokens=30))[0]
    full = tiny_llm.tokenizer.decode(base)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    index = full.find(stop)  # the first occurrence ends generation
    out = tiny_llm.generate(["stop here please"], greedy(max_tokens=30, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:index]
    out = tiny_llm.generate(["stop here please"], greedy(max_tokens=30, stop=[stop], include_stop_str_in_output=True),
                            use_tqdm=False)[0].outputs[0]
    assert out.text == full[:index + len(stop)]
    out = tiny_llm.generate(["stop here please"], greedy(max_tokens=30, stop_token_ids=[base[3]]),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == base[3] and out.token_ids == base[:4]


def test_streamed_text_only_grows(tiny_llm):
    engine = tiny_llm.engine
    base = texts(tiny_llm, ["streaming text"], greedy(max_tokens=30))[0]
    full = tiny_llm.tokenizer.decode(base)
    stop = full[-6:-2]
    engine.add_request("streaming text", greedy(max_tokens=30, stop=[stop]), "stream")
    seen = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            assert text.startswith(seen)
            seen = text
    assert stop not in seen and seen == full[:full.find(stop)]


def test_max_tokens(tiny_llm):
    out = tiny_llm.generate(["count"], greedy(max_tokens=7), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7


def test_logprobs_match_hf(tiny_llm, tiny_model):
    prompt = "log probabilities of every token"
    out = tiny_llm.generate([prompt], greedy(max_tokens=6, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    n = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for j in range(1, n):
        entry = out.prompt_logprobs[j]
        assert entry.token_id == ids[j]
        assert abs(entry.logprob - ref[j - 1, ids[j]].item()) < 1e-4
        assert len(entry.top) == 2 and abs(entry.top[0][1] - ref[j - 1].max().item()) < 1e-4
    for k, entry in enumerate(out.outputs[0].logprobs):
        assert entry.rank == 1 and entry.top[0][0] == entry.token_id  # greedy picks the top token
        assert abs(entry.logprob - ref[n - 1 + k, entry.token_id].item()) < 1e-4
        assert len(entry.top) == 3


def test_max_tokens_0_computes_the_prompt_only(tiny_llm):
    prompt = "only the prompt is scored"
    one = tiny_llm.generate([prompt], greedy(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    outs = tiny_llm.generate([prompt], greedy(max_tokens=0, prompt_logprobs=1, n=2, logprobs=1), use_tqdm=False)
    out = outs[0]
    assert out.finished and [c.finish_reason for c in out.outputs] == ["length", "length"]
    assert all(c.token_ids == [] and c.text == "" and c.logprobs == [] for c in out.outputs)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(one.prompt_logprobs)
    for e, ref in zip(out.prompt_logprobs[1:], one.prompt_logprobs[1:]):
        assert e.token_id == ref.token_id and e.logprob == pytest.approx(ref.logprob, abs=1e-5)
    assert_idle(tiny_llm.engine)


def test_errors_name_the_limit(tiny_llm):
    engine = tiny_llm.engine
    with pytest.raises(ValueError, match="context length"):
        engine.add_request(list(range(engine.max_model_len + 5)), greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 10**9], greedy())
    assert_idle(engine)
