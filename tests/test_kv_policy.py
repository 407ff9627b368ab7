"""KV policies (infera/engine/kv_policy.py): which blocks a long sequence keeps, that evicted blocks
are freed, that attention after an eviction is attention over the kept tokens (against HF
transformers with the same tokens dropped from its cache), and that the policies compose with
prefix caching, preemption, forks and speculative decoding."""
from __future__ import annotations

import re

import pytest
import torch

from infera import LLM, SamplingParams
from infera.engine.block_manager import BlockManager
from infera.engine.kv_policy import KVPolicy
from infera.engine.sequence import Sequence

BS = 16


def seq_with(num_prompt: int, num_output: int = 0, computed: int | None = None) -> Sequence:
    seq = Sequence(list(range(num_prompt + num_output)), SamplingParams())
    seq.num_prompt_tokens = num_prompt
    seq.num_computed_tokens = num_prompt + num_output if computed is None else computed
    return seq


def test_blocks_to_evict():
    policy = KVPolicy("streaming", budget=64, sink_tokens=4)  # 1 sink block + 3 window blocks
    assert policy.blocks_to_evict(seq_with(64), BS) == []
    assert policy.blocks_to_evict(seq_with(65), BS) == [1]  # 5 blocks held: the second goes
    assert policy.blocks_to_evict(seq_with(200), BS) == list(range(1, 10))
    assert KVPolicy("streaming", budget=64, sink_tokens=20).blocks_to_evict(seq_with(200), BS) == list(range(2, 11))
    # no sinks: a sliding window of whole blocks
    assert KVPolicy("streaming", budget=64, sink_tokens=0).blocks_to_evict(seq_with(200), BS) == list(range(9))
    # a budget below the sinks keeps the sinks and the block being written
    assert KVPolicy("streaming", budget=2, sink_tokens=4).blocks_to_evict(seq_with(200), BS) == list(range(1, 12))
    # a fraction budgets the prompt; generated tokens are kept on top
    half = KVPolicy("streaming", budget=0.5)
    assert half.budget_tokens(seq_with(200, 10)) == 110
    assert half.blocks_to_evict(seq_with(200, 10), BS) == list(range(1, 8))
    assert KVPolicy("streaming", budget=1.0).blocks_to_evict(seq_with(500, 300), BS) == []
    assert KVPolicy().blocks_to_evict(seq_with(5000), BS) == []
    # counted in held blocks: after an eviction the hole no longer counts
    seq = seq_with(200)
    seq.num_evicted_tokens, seq.evicted_from, seq.kept_from = 9 * BS, BS, 10 * BS
    assert policy.blocks_to_evict(seq, BS) == []
    # blocks a policy chose to keep go after the recent ones, while there is room
    seq = seq_with(200)
    seq.kv_pinned = 2
    assert policy.blocks_to_evict(seq, BS) == list(range(3, 12))


def test_snapkv_ranks_blocks_by_window_attention():
    policy = KVPolicy("snapkv", budget=96, sink_tokens=4)  # 6 blocks: 1 sink, 3 recent, 2 chosen
    seq = seq_with(200, computed=150)
    assert policy.observation_window(seq) == 32 and policy.blocks_to_evict(seq, BS) == []  # waits for the prompt
    seq = seq_with(200)
    assert policy.observation_window(seq) == 0
    scores = [0.0] * 200
    scores[5 * BS + 3] = 2.0  # block 5
    scores[8 * BS] = 1.0  # block 8 (and, pooled over 7 positions, the end of block 7)
    seq.kv_scores = scores
    # 13 blocks: sink 0, recent 10-12, middle 1-9 ranked: 5 first, then 8 (7 ties 8 below it)
    assert policy.blocks_to_evict(seq, BS) == [1, 2, 3, 4, 6, 7, 9]
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    seq.num_computed_tokens = 0
    assert bm.allocate_slots(seq, 200)
    bm.commit(seq, 200)
    table = list(seq.block_table)
    assert policy.evict(seq, bm) == 7
    assert seq.block_table == [table[i] for i in (0, 5, 8, 10, 11, 12)]
    assert (seq.kv_scores, seq.kv_pinned, seq.evicted_from, seq.kept_from) == (None, 2, BS, 10 * BS)
    # a prompt the budget covers is not observed (no eviction, no scores)
    assert KVPolicy("snapkv", budget=1.0).observation_window(seq_with(200, computed=0)) == 0


def test_window_attention_is_the_summed_softmax():
    from infera.layers.paged_attention import window_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    want = torch.zeros(4, 20)
    for h in range(4):
        for j in range(5):
            pos = 20 - 5 + j
            logits = (k[:pos + 1, h // 2] @ q[j, h]) * 0.3
            want[h, :pos + 1] += logits.softmax(0)
    assert torch.allclose(window_attention(q, k, 0.3), want.amax(dim=0), atol=1e-5)


def test_bad_settings_are_refused():
    for kw in (dict(kv_policy="h2o"), dict(kv_budget=0), dict(kv_budget=1.5), dict(kv_budget=float("nan")),
               dict(kv_sink_tokens=-1), dict(kv_budget=True)):
        with pytest.raises(ValueError, match="kv_"):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="needs a kv_budget"):
        KVPolicy("streaming")
    # a request's policy without a budget where the engine has none: refused when added
    assert KVPolicy().for_request(None, None, None) == KVPolicy()
    with pytest.raises(ValueError, match="needs a kv_budget"):
        KVPolicy().for_request("streaming", None, 8)
    assert KVPolicy("streaming", 64).for_request(None, 0.5, None) == KVPolicy("streaming", 0.5)
    assert KVPolicy("streaming", 64).for_request("none", None, None).budget_tokens(seq_with(9)) is None


def test_block_manager_evict_frees_unshared_blocks():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    seq = seq_with(100, computed=0)
    assert bm.allocate_slots(seq, 100)
    bm.commit(seq, 100)
    child = Sequence(seq.token_ids, seq.params)
    bm.fork(seq, child)
    table = list(seq.block_table)
    bm.evict(seq, [1, 2, 3])
    assert seq.block_table == [table[0]] + table[4:]
    assert (seq.num_evicted_tokens, seq.evicted_from, seq.kept_from, seq.num_kv_tokens) == (48, 16, 64, 52)
    assert bm.num_free_blocks == 20 - 7  # the child still holds them all
    bm.evict(child, [1, 2, 3])
    assert bm.num_free_blocks == 20 - 4
    with pytest.raises(ValueError, match="cannot evict"):
        bm.evict(seq, [3])  # the block being written stays
    # holes anywhere: tokens before the first at their slots, the tail after the last
    other = seq_with(100, computed=0)
    assert bm.allocate_slots(other, 100)
    bm.commit(other, 100)
    bm.evict(other, [3])
    bm.evict(other, [1, 4])  # (table entry 4 is block 5)
    assert (other.evicted_from, other.kept_from, other.num_evicted_tokens) == (16, 96, 48)
    bm.evict(other, [1])  # block 2, before the tail: the tail stays where it was
    assert (other.evicted_from, other.kept_from, other.num_kv_tokens, len(other.block_table)) == (16, 96, 36, 3)
    bm.free(other)
    # a new token goes after the hole
    seq.token_ids.append(7)
    assert bm.allocate_slots(seq, 1)
    assert len(seq.block_table) == 4
    bm.commit(seq, 1)
    # rolling back past the hole keeps only the tokens before it
    bm.truncate(seq, 40)
    assert (seq.block_table, seq.num_computed_tokens, seq.num_evicted_tokens) == ([table[0]], 16, 0)
    bm.free(seq)
    bm.free(child)
    assert bm.num_free_blocks == 20


def test_full_budget_is_identical(tiny_llm):
    prompt = list(range(1000, 1300))
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = tiny_llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    for kw in (dict(kv_budget=1.0), dict(kv_budget=340)):
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, kv_policy="streaming", **kw)
        got = tiny_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want
    evicting = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, kv_policy="streaming", kv_budget=64)
    assert tiny_llm.generate([prompt], evicting, use_tqdm=False)[0].outputs[0].token_ids != want


def test_attention_after_eviction_matches_hf(tiny_model):
    """Prompt of 100 tokens prefilled whole; before the next step, streaming (budget 48, 4 sinks)
    drops tokens 16-79: the next token's log-probabilities equal HF's with those positions cut
    from its cache and the query at its true position (float32, 1e-4)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", enable_prefix_caching=False)
    prompt = [(37 * i) % 5000 + 100 for i in range(100)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=5, kv_policy="streaming",
                            kv_budget=48, kv_sink_tokens=4)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert llm.engine.scheduler.num_evicted_blocks == 4
    first, second = out.token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        full = hf(torch.tensor([prompt]), use_cache=True)
        cache = full.past_key_values
        assert int(full.logits[0, -1].argmax()) == first
        keep = list(range(16)) + list(range(80, 100))
        cut = DynamicCache()
        for i, layer in enumerate(cache.layers):
            cut.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
        nxt = hf(torch.tensor([[first]]), cache=cut, position_ids=torch.tensor([[100]]),
                 cache_position=torch.tensor([len(keep)]))
    ref = torch.log_softmax(nxt.logits[0, -1].float(), dim=-1)
    assert int(ref.argmax()) == second
    top = out.logprobs[1].top
    assert len(top) == 5
    for token, logprob in top:
        assert abs(logprob - float(ref[token])) < 1e-4, token


def test_blocks_stay_bounded_and_are_freed(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, kv_policy="streaming", kv_budget=64)
    engine.add_request(list(range(2000, 2150)), params, "long")
    most, evicted = 0, engine.scheduler.num_evicted_blocks
    while engine.has_unfinished_requests():
        engine.step()
        held = [len(s.block_table) for s in engine.scheduler.running]
        if engine.scheduler.num_evicted_blocks > evicted:  # after the prompt's one chunk (10 blocks)
            most = max([most] + held)
    # 4 blocks kept (1 sink + 3 window) and the block of the step's new token
    assert most == 4 + 1
    assert_idle(engine)


def assert_idle(engine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_long_prompt_evicts_between_chunks(tiny_model):
    """A prompt of 600 tokens in chunks of 128 under a budget of 64: never more than the budget, a
    chunk and a block; the blocks computed before the first eviction stay cached, the later ones
    are not (their KV saw a cut context)."""
    llm = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=128)
    engine = llm.engine
    prompt = list(range(3000, 3600))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, kv_policy="streaming", kv_budget=64)
    engine.add_request(prompt, params, "p")
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max([most] + [len(s.block_table) for s in engine.scheduler.running])
    assert most <= 4 + 128 // BS + 1
    assert engine.block_manager.cached_prefix(prompt) == engine.block_manager.cached_prefix(prompt[:128])
    assert len(engine.block_manager.cached_prefix(prompt)) == 128 // BS
    assert_idle(engine)


def test_composes_with_prefix_caching_forks_preemption_and_speculation(tiny_model):
    path = str(tiny_model("llama"))
    prompts = [list(range(4000 + 100 * i, 4000 + 100 * i + 150)) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, kv_policy="streaming", kv_budget=64)
    base = LLM(path, dtype="float32", kv_cache_memory="16MiB", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    # prefix hits (the same prompts again) and a batch: the same tokens
    cached = LLM(path, dtype="float32", kv_cache_memory="16MiB")
    for _ in range(2):
        assert [o.outputs[0].token_ids for o in cached.generate(prompts, params, use_tqdm=False)] == want
    assert cached.engine.scheduler.prefix_hits > 0
    assert_idle(cached.engine)
    # a KV cache too small for four sequences at once: preempted and recomputed, all finish
    # (8 KiB a block; 12 blocks, while a sequence holds up to 9; the engine's policy lets a sequence
    # outgrow the cache)
    small = LLM(path, dtype="float32", kv_cache_memory=12 * 8192, max_num_batched_tokens=64, kv_policy="streaming",
                kv_budget=64)
    assert small.engine.block_manager.num_blocks == 12 and small.engine.max_model_len == 2048
    outs = small.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 60 for o in outs)
    assert small.engine.scheduler.num_preemptions > 0
    assert_idle(small.engine)
    # n samples share the prompt's blocks and evict on their own
    forked = base.generate([prompts[0]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=60, ignore_eos=True,
                                                         kv_policy="streaming", kv_budget=64), use_tqdm=False)
    assert len({tuple(c.token_ids) for c in forked[0].outputs}) > 1
    assert_idle(base.engine)
    # speculative decoding (prompt lookup) runs under the policy and frees everything
    spec = LLM(path, dtype="float32", kv_cache_memory="16MiB", speculative="ngram")
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 60 for o in outs)
    assert spec.engine.scheduler.num_evicted_blocks > 0
    assert_idle(spec.engine)


def test_engine_default_policy_and_request_override(tiny_model):
    llm = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB", kv_policy="streaming",
              kv_budget=48)
    prompt = list(range(5000, 5200))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([prompt], greedy, use_tqdm=False)
    evicted = llm.engine.scheduler.num_evicted_blocks
    assert evicted > 0
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, kv_policy="none"),
                 use_tqdm=False)
    assert llm.engine.scheduler.num_evicted_blocks == evicted
    with pytest.raises(ValueError, match="needs a kv_budget"):
        LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB", kv_policy="streaming")


def test_passkey_task(tiny_model, tmp_path):
    """`infera eval --task passkey`: problems of the asked length with the needle at its depth; rows
    per policy and length with the KV held measured (a tiny random model answers nothing right)."""
    import argparse

    from infera.eval import passkey

    engine = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB").engine
    tok = engine.tokenizer
    hay = list(range(500, 900))
    tokens = passkey.problem(tok, hay, 300, 0.5, 12345, 7)
    assert len(tokens) == 300
    hidden = tok.encode(passkey.needle(12345), add_special_tokens=False)
    at = next(i for i in range(len(tokens)) if tokens[i:i + len(hidden)] == hidden)
    assert 0.4 < at / 300 < 0.6
    assert passkey.parse_policy("streaming:0.25") == {"kv_policy": "streaming", "kv_budget": 0.25}
    assert passkey.parse_policy("streaming:512") == {"kv_policy": "streaming", "kv_budget": 512}
    with pytest.raises(ValueError, match="needs a budget"):
        passkey.parse_policy("streaming")
    problems = {300: [(tokens, 12345)]}
    full, = passkey.evaluate(engine, "none", problems, 4)
    cut, = passkey.evaluate(engine, "streaming:0.25", problems, 4)
    assert full.kv_fraction == 1.0 and cut.kv_fraction < 0.4
    args = argparse.Namespace(task="passkey", lengths="200", depths="0.5", samples=1, kv_policies="none,streaming:64",
                              answer_tokens=3, passkey_seed=0, json=True, csv=str(tmp_path / "p.csv"),
                              plot=str(tmp_path / "p.png"))
    passkey.run(args, dict(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB"))
    assert (tmp_path / "p.png").stat().st_size > 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3


def test_multi_key_niah_task(tiny_model, tmp_path):
    """`infera eval --task niah`: every key's needle is in the haystack once, the asked one at its depth,
    the question names the asked key and the answer is its number; the run writes its rows."""
    import argparse

    from infera.eval import passkey

    tok = LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB").tokenizer
    problems = passkey.make_niah_problems(tok, [600], [0.2, 0.8], 3, seed=5, num_keys=4)
    assert len(problems[600]) == 6
    for i, (tokens, value) in enumerate(problems[600]):
        assert len(tokens) == 600
        text = tok.decode(tokens)
        found = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
        assert len(found) == 4 and len({k for k, _ in found}) == 4
        asked = dict((v, k) for k, v in found)[str(value)]
        assert text.endswith(f"What is the special magic number for {asked}? The special magic number for {asked} is:")
        depth = text.index(f"for {asked} is: {value}") / text.index("\n\nWhat is")
        assert abs(depth - (0.2, 0.8)[i // 3]) < 0.1
    with pytest.raises(ValueError, match="num-keys"):
        passkey.make_niah_problems(tok, [600], [0.5], 1, seed=0, num_keys=0)
    with pytest.raises(ValueError, match="too short"):
        passkey.make_niah_problems(tok, [60], [0.5], 1, seed=0, num_keys=4)
    args = argparse.Namespace(task="niah", num_keys=3, lengths="300", depths="0.5", samples=2, kv_policies="none",
                              answer_tokens=4, passkey_seed=0, json=True, csv=str(tmp_path / "n.csv"), plot=None)
    passkey.run(args, dict(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB"))
    rows = (tmp_path / "n.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("none,300,2,")


def test_snapkv_scores_match_hf_attention(tiny_model):
    """The runner's window scores of a prompt prefilled in chunks (the last holding the window) are
    HF transformers' attention weights of the last 32 positions, summed over the queries, the most
    of any head and layer; the blocks ranked from them are evicted before the first decode."""
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", enable_prefix_caching=False,
              max_num_batched_tokens=128)
    engine = llm.engine
    prompt = [(53 * i) % 7000 + 100 for i in range(150)]  # chunks 118 + 32 (the window stays whole)
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, kv_policy="snapkv",
                                              kv_budget=64), "s")
    seq = engine.requests["s"].seqs[0]
    scores, chunks = None, []
    while scores is None:
        engine.step()
        chunks.append(seq.num_computed_tokens)
        scores = seq.kv_scores
    assert chunks == [118, 150]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        att = hf(torch.tensor([prompt]), output_attentions=True).attentions
    want = torch.stack([a[0, :, -32:, :].sum(dim=1).amax(dim=0) for a in att]).amax(dim=0)
    assert torch.allclose(torch.tensor(scores), want, atol=1e-4)
    engine.step()
    assert seq.kv_scores is None and len(seq.block_table) <= 4 + 1 and seq.num_evicted_tokens > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(engine)


def test_snapkv_full_budget_is_identical(tiny_llm):
    prompt = list(range(1000, 1300))
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = tiny_llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    same = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, kv_policy="snapkv", kv_budget=1.0)
    assert tiny_llm.generate([prompt], same, use_tqdm=False)[0].outputs[0].token_ids == want
    cut = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, kv_policy="snapkv", kv_budget=0.25)
    assert len(tiny_llm.generate([prompt], cut, use_tqdm=False)[0].outputs[0].token_ids) == 30
    assert_idle(tiny_llm.engine)


def test_longppl_task(tiny_model, capsys):
    """`infera eval --task longppl`: the second half of a window scored with full KV and under a
    streaming budget that evicts between the prompt's chunks (a different score); snapkv skipped."""
    import argparse
    import json

    from infera.eval import longppl

    args = argparse.Namespace(windows=1, window_len=400, score_from=None, json=True,
                              kv_policies="none,streaming:64,snapkv:0.5")
    longppl.run(args, dict(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB",
                           max_num_batched_tokens=128))
    out = capsys.readouterr().out
    assert "snapkv:0.5: skipped" in out
    full, cut = json.loads(out[out.index("["):])
    assert (full["policy"], full["score_from"], full["tokens"]) == ("none", 200, 200)
    assert cut["policy"] == "streaming:64" and cut["perplexity"] != full["perplexity"]
    assert cut["vs_full"] == pytest.approx(cut["perplexity"] / full["perplexity"])
