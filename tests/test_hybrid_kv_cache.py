"""The hybrid KV cache of sliding-window models (infera.engine.kv_cache, infera.engine.sliding_window).

A tiny random-weight Gemma 3 with llama.cpp's layer pattern (five sliding layers of window 16 per
full-attention layer) against the same model with every layer keeping its whole context
(``disable_hybrid_kv_cache_manager``): logits within 1e-5 (float32; the sliding layers' prefill
attention runs over a shorter gathered context), greedy outputs token-identical through chunked
prefill, batching, forks, speculative decoding, preemption and prefix-cache hits, with no block
leaked; a long sequence holds its full layers' context plus a few blocks per sliding group; a prefix
hit needs the window's blocks in every sliding group.
"""
from __future__ import annotations

import pytest
import torch

from conftest import engine_logits
from infera import LLM, SamplingParams
from infera.engine.block_manager import BlockManager
from infera.engine.sequence import Sequence
from infera.engine.sliding_window import CHUNK

WINDOW = 16  # the tiny Gemma's sliding window
PROSE = "The quick brown fox jumps over the lazy dog while paged attention keeps the KV cache in blocks. "


@pytest.fixture(scope="module")
def path(tiny_model):
    return str(tiny_model("gemma3_gguf"))


def make(path: str, hybrid: bool, **kwargs) -> LLM:
    kwargs = {"dtype": "float32", "kv_cache_memory": "16MiB", "max_num_batched_tokens": 96, **kwargs}
    return LLM(path, disable_hybrid_kv_cache_manager=not hybrid, **kwargs)


@pytest.fixture(scope="module")
def pair(path) -> tuple[LLM, LLM]:
    return make(path, True), make(path, False)


def prompts(llm: LLM, lengths: tuple[int, ...]) -> list[list[int]]:
    ids = llm.engine.tokenizer.encode(PROSE * 40)
    return [ids[:n] for n in lengths]


def no_leaks(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_groups(pair):
    hybrid, full = pair
    kv = hybrid.engine.runner.kv_cache
    assert (kv.num_window_groups, kv.sliding_window) == (5, WINDOW)
    assert kv.data.shape[1] == 1  # one full-attention layer: groups of one layer
    assert full.engine.runner.kv_cache.num_window_groups == 0
    # a page holds one layer here, six there: the same memory holds about six times the blocks
    assert kv.num_blocks // 6 == full.engine.runner.kv_cache.num_blocks
    assert hybrid.engine.worker.kv_cache_tokens > 5 * full.engine.worker.kv_cache_tokens  # the longest context


def test_logits_match_full_kv(pair):
    hybrid, full = pair
    [ids] = prompts(hybrid, (300,))
    for chunks in ([300], [40, 100, 150] + [1] * 10, [200] + [1] * 100):
        ours, ref = engine_logits(hybrid.engine, ids, chunks), engine_logits(full.engine, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-5, f"chunks {chunks[:4]}...: max |diff| {diff:.2e}"
    no_leaks(hybrid)


def test_long_sequence_keeps_only_the_window(pair):
    hybrid, _ = pair
    engine, bm = hybrid.engine, hybrid.engine.block_manager
    seq = Sequence((prompts(hybrid, (600,))[0] * 2)[:1000], SamplingParams())
    held = []
    with torch.inference_mode():
        for n in [96] * 10 + [40]:
            assert bm.allocate_slots(seq, n)
            engine.runner.hidden_states([seq], [n])
            bm.commit(seq, n)
            held.append(bm.num_held_blocks(seq))
    bs = bm.block_size
    assert len(seq.block_table) == 1000 // bs + 1
    # each sliding table: the window, the step's tokens and at most a chunk's worth before the window
    per_group = bm.window.max_blocks(96)
    assert all(len(t) - seq.window_freed <= -(-(WINDOW + 96) // bs) + 1 for t in seq.window_tables)
    assert all(len(t) <= per_group for t in seq.window_tables)
    assert seq.window_start % CHUNK == 0 and seq.window_start > 0
    assert bm.num_free_blocks == bm.num_blocks - held[-1]
    assert held[-1] < 2 * (1000 // bs + 1)  # against six blocks per block of context without the hybrid cache
    bm.free(seq)
    no_leaks(hybrid)


def test_greedy_identical_batched_and_chunked(pair):
    hybrid, full = pair
    batch = prompts(hybrid, (20, 150, 333, 500))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in hybrid.generate(batch, params, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in full.generate(batch, params, use_tqdm=False)]
    alone = [hybrid.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    assert ours == ref == alone
    no_leaks(hybrid)


def test_forks_sample_identically(pair):
    hybrid, full = pair
    batch = prompts(hybrid, (200, 400))
    params = SamplingParams(n=3, temperature=1.0, max_tokens=30, seed=7, ignore_eos=True)
    ours = [[c.token_ids for c in o.outputs] for o in hybrid.generate(batch, params, use_tqdm=False)]
    ref = [[c.token_ids for c in o.outputs] for o in full.generate(batch, params, use_tqdm=False)]
    assert ours == ref
    assert all(len({tuple(c) for c in out}) > 1 for out in ours)  # the forks went their own ways
    no_leaks(hybrid)


@pytest.mark.parametrize("speculative", ["ngram", "self:1-3"])
def test_speculative_decoding_is_lossless(path, pair, speculative):
    _, full = pair
    spec = make(path, True, speculative=speculative)
    text = PROSE * 3  # repetitive: the n-gram proposer drafts
    batch = [spec.engine.tokenizer.encode(text * k) for k in (2, 8)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in spec.generate(batch, params, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in full.generate(batch, params, use_tqdm=False)]
    assert ours == ref
    no_leaks(spec)


def test_preemption_recomputes_identically(path, pair):
    _, full = pair
    small = make(path, True, kv_cache_memory="600KiB", max_num_seqs=8)
    from pydoc_data.topics import topics

    ids = small.engine.tokenizer.encode(" ".join(topics[k] for k in sorted(topics))[:20_000])
    batch = [ids[400 * i:400 * i + n] for i, n in enumerate((150, 180, 210, 240, 270, 300))]  # prose, no prefix shared
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in small.generate(batch, params, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in full.generate(batch, params, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert ours == ref
    no_leaks(small)


def test_prefix_hits_are_lossless(pair):
    hybrid, full = pair
    [base] = prompts(hybrid, (400,))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    hybrid.engine.reset_prefix_cache()
    first = hybrid.generate([base], params, use_tqdm=False)[0]
    batch = [base[:300] + base[:37], base[:150] + base[200:230], base]
    outs = hybrid.generate(batch, params, use_tqdm=False)
    assert first.metrics.num_cached_tokens == 0
    assert [o.metrics.num_cached_tokens for o in outs] == [288, 144, 384]  # whole blocks, one token left to compute
    full.engine.reset_prefix_cache()
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in full.generate(
        batch, params, use_tqdm=False)]
    # disaggregation sends one group's blocks, no use to a hybrid cache: nothing is sent
    assert hybrid.engine.worker.kv_connector.send(base) is None
    assert full.engine.worker.kv_connector.send(base) is not None
    no_leaks(hybrid)


def test_kv_policies_evict_from_the_global_layers(pair):
    """A policy's budget bounds the global group's table; the local groups keep their windows (and
    a budget covering the prompt changes nothing)."""
    hybrid, _ = pair
    engine, bs = hybrid.engine, hybrid.engine.block_manager.block_size
    batch = prompts(hybrid, (300, 420))
    greedy = {"temperature": 0.0, "max_tokens": 30, "ignore_eos": True}
    outs = [[o.outputs[0].token_ids for o in hybrid.generate(batch, SamplingParams(**greedy, **policy),
                                                              use_tqdm=False)]
            for policy in ({}, {"kv_policy": "snapkv", "kv_budget": 1.0})]
    assert outs[0] == outs[1]
    for policy in ("streaming", "snapkv"):
        for p in batch:
            engine.add_request(p, SamplingParams(**greedy, kv_policy=policy, kv_budget=64))
        most, window = 0, engine.block_manager.window.max_blocks(96)
        while engine.has_unfinished_requests():
            engine.step()
            for s in engine.scheduler.running:
                assert all(len(t) - s.window_freed <= window for t in s.window_tables)
                if s.num_output_tokens > 1:
                    most = max(most, len(s.block_table))
        assert engine.scheduler.num_evicted_blocks > 0 and most <= 64 // bs + 2, policy
    no_leaks(hybrid)


def block_manager(num_blocks: int = 64, prefix_caching: bool = False) -> BlockManager:
    return BlockManager(num_blocks, 16, enable_prefix_caching=prefix_caching, window_groups=2, sliding_window=WINDOW)


def test_blocks_released_as_the_window_moves():
    bm = block_manager()
    seq = Sequence(list(range(400)), SamplingParams())
    assert bm.allocate_slots(seq, 100)
    assert bm.num_held_blocks(seq) == 7 * 3 and seq.window_freed == 0
    bm.commit(seq, 100)
    assert bm.allocate_slots(seq, 1)  # the next query reads positions 85-100: blocks 0-4 are released
    assert seq.window_freed == 5 and seq.window_start == 0
    assert bm.num_held_blocks(seq) == 7 + 2 * 2
    bm.commit(seq, 1)
    assert bm.allocate_slots(seq, 99)
    bm.commit(seq, 99)
    assert bm.allocate_slots(seq, 1)  # the window passed position 128: the tables start there
    assert seq.window_start == CHUNK and seq.window_freed == (185 - CHUNK) // 16
    assert bm.num_held_blocks(seq) + bm.num_free_blocks == bm.num_blocks
    bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_fork_copies_the_shared_block_and_truncation_past_the_window_recomputes():
    bm = block_manager()
    parent = Sequence(list(range(300)), SamplingParams())
    assert bm.allocate_slots(parent, 150)
    bm.commit(parent, 150)
    assert bm.allocate_slots(parent, 1)  # releases positions before 135; the tables start at 128
    bm.commit(parent, 1)
    assert parent.window_start == CHUNK
    child = Sequence(list(range(300)), SamplingParams())
    bm.fork(parent, child)
    assert bm.allocate_slots(child, 1)  # block 9 (positions 144-159) is shared: copied in all three groups
    assert len(bm.pending_copies) == 3 and child.window_tables[0][-1] != parent.window_tables[0][-1]
    bm.pending_copies = []
    other = Sequence(list(range(300)), SamplingParams())
    bm.fork(parent, other)
    bm.truncate(other, 100)  # a query at 100 would read positions 85-99, released: nothing usable is left
    assert other.num_computed_tokens == 0 and other.block_table == [] and other.window_tables == []
    bm.truncate(child, 149)  # still inside the window: kept
    assert child.num_computed_tokens == 149 and child.window_tables
    for seq in (parent, child):
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_needed_counts_what_allocate_takes():
    bm = block_manager(40)
    seq = Sequence(list(range(400)), SamplingParams())
    for n in (90, 30, 1, 1, 70, 16):
        bm.window.release(seq)
        need = bm.blocks_for(seq.num_computed_tokens + n) - len(seq.block_table) + bm.window.needed(seq, n)
        free = bm.num_free_blocks
        assert bm.allocate_slots(seq, n)
        assert free - bm.num_free_blocks == need
        bm.commit(seq, n)
    assert not bm.allocate_slots(seq, 400)  # more than the pool: refused, nothing taken
    assert bm.num_held_blocks(seq) + bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_needs_the_window_in_every_sliding_group():
    tokens = list(range(100, 200))
    for num_blocks, hit in ((64, 3), (15, 0)):
        bm = block_manager(num_blocks, prefix_caching=True)
        a = Sequence(tokens, SamplingParams())
        assert bm.allocate_slots(a, 64)
        bm.commit(a, 64)
        # releases positions before 49 (sliding blocks 0-2); in a pool of 15 blocks the 36 tokens reuse them
        assert bm.allocate_slots(a, 36)
        bm.commit(a, 36)
        bm.free(a)
        b = Sequence(tokens[:48] + [7] * 12, SamplingParams())
        hits = bm.get_computed_blocks(b)
        assert bm.cached_prefix(b.token_ids) and len(hits) == hit  # full-attention blocks 0-2 are cached in both
        assert bm.allocate_slots(b, 60 - hit * 16, hits)
        assert b.num_computed_tokens == hit * 16
        if hit:  # the query at 48 reads positions 33-47: block 2 of each sliding group, block 0-1 left out
            assert b.window_start == 0 and b.window_freed == 2 and all(t[2] != 0 for t in b.window_tables)
            assert b.block_table[:3] == bm.cached_prefix(tokens[:48])
        bm.free(b)
        assert bm.num_free_blocks == bm.num_blocks
