"""KV offloading: the host tier of the prefix cache.  Its bookkeeping (LRU, blocks held while they
load), the block manager's offloads and loads as ordered copies, the KV pool carrying them out
bit-exactly, and an engine whose evicted prompts come back from the host tier token-identical to
an engine that recomputes them (greedy and seeded sampling, float and int8 caches)."""
from __future__ import annotations

import pytest
import torch

from infera import LLM, SamplingParams
from infera.config import EngineConfig
from infera.engine.block_manager import BlockManager
from infera.engine.kv_cache import KVCachePool
from infera.engine.kv_offload import HostBlockPool
from infera.engine.llm_engine import LLMEngine
from infera.engine.sequence import Sequence
from infera.layers.attention import Attention
from test_engine import WORDS, assert_idle


def seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def run(bm: BlockManager, s: Sequence, hits: list[int] | None = None) -> None:
    """Allocate and 'compute' all pending tokens of ``s`` (after its prefix ``hits``)."""
    n = s.num_tokens - len(hits or []) * bm.block_size
    assert bm.allocate_slots(s, n, hits)
    bm.commit(s, n)


def test_host_pool_evicts_the_least_recently_used_and_never_a_held_block():
    pool = HostBlockPool(2)
    a, b, c = (hash(x) for x in "abc")
    slot_a = pool.store(a, (1,))
    slot_b = pool.store(b, (2,))
    assert {slot_a, slot_b} == {0, 1} and pool.num_cached_blocks == 2
    assert pool.store(a, (1,)) is None  # held already: no copy, now most recently used
    assert pool.lookup(a, (9,)) is None  # same hash, other tokens: not a hit
    assert pool.store(c, (3,)) == slot_b  # b was least recently used
    assert pool.lookup(b, (2,)) is None and pool.lookup(c, (3,)) == slot_b
    assert pool.hold([slot_a, slot_b]) == [(a, (1,)), (c, (3,))]
    assert pool.store(hash("d"), (4,)) is None  # every block held for a load: nothing to evict
    pool.release([slot_a, slot_b])
    assert pool.lookup(a, (1,)) == slot_a
    assert pool.store(hash("d"), (4,)) == slot_b  # c, released before a was looked up, goes first
    pool.clear()
    assert pool.num_cached_blocks == 0 and pool.lookup(a, (1,)) is None


def test_evicted_blocks_go_to_the_host_and_come_back_as_ordered_copies():
    bm = BlockManager(4, 4, num_host_blocks=8)
    a = seq(list(range(13)))  # 3 full blocks and a partial one: the whole device cache
    run(bm, a)
    table_a = list(a.block_table)
    bm.free(a)
    assert bm.pending_copies == []
    b = seq(list(range(100, 108)))  # 2 blocks: evicts a's partial block (unhashed) and its last full one
    run(bm, b)
    assert bm.pending_copies == [(table_a[2], ~0)] and bm.num_offloaded_blocks == 1
    bm.pending_copies = []
    bm.free(b)

    again = seq(list(range(13)))
    hits = bm.get_computed_blocks(again)
    assert hits == [table_a[0], table_a[1], ~0]  # two blocks on the device, the third on the host
    run(bm, again, hits)
    loaded = again.block_table[2]
    assert again.block_table[:2] == table_a[:2] and again.num_cached_tokens == 12
    # the blocks taken (for the load, then for the last token) were b's, cached and full: each went to
    # the host before it was reused
    assert bm.pending_copies == [(loaded, ~1), (~0, loaded), (again.block_table[3], ~2)]
    assert (bm.num_offloaded_blocks, bm.num_loaded_blocks, bm.host.num_cached_blocks) == (3, 1, 3)
    assert bm.cached_prefix(list(range(13))) == again.block_table[:3]  # cached on the device again
    bm.free(again)
    assert bm.num_free_blocks == 4


def test_loads_never_evict_the_prefix_they_extend_and_a_failed_allocation_changes_nothing():
    bm = BlockManager(4, 2, num_host_blocks=4)
    a = seq(list(range(8)))  # 4 full blocks
    run(bm, a)
    bm.free(a)  # free order: a's blocks tail first
    run(bm, b := seq([50, 51, 52, 53]))  # takes a's blocks 3 and 2: offloaded
    bm.free(b)
    bm.pending_copies = []
    again = seq(list(range(8)))
    hits = bm.get_computed_blocks(again)
    assert [h < 0 for h in hits] == [False, False, True]  # the last block is computed, not looked up
    assert not bm.allocate_slots(again, 2, hits, reserve=1)  # 2 device hits + 1 load + 1 new > 4 free - 1
    assert again.block_table == [] and bm.pending_copies == [] and bm.num_free_blocks == 4
    assert bm.allocate_slots(again, 2, hits)
    assert again.block_table[:2] == hits[:2]  # the device hits were kept, the loads took b's blocks
    assert [src for src, _ in bm.pending_copies if src < 0] == hits[2:]


def test_host_tier_needs_prefix_caching_and_a_draft_model_gets_none(tiny_model, caplog):
    with pytest.raises(ValueError, match="prefix caching"):
        BlockManager(4, 4, enable_prefix_caching=False, num_host_blocks=4)
    with pytest.raises(ValueError, match="kv_offloading_size"):
        EngineConfig(kv_offloading_size=0)
    path = str(tiny_model("llama"))
    off = LLMEngine(model=path, dtype="float32", kv_offloading_size=0.01, enable_prefix_caching=False)
    assert off.block_manager.host is None and "kv_offloading_size ignored" in caplog.text
    spec = LLMEngine(model=path, dtype="float32", kv_offloading_size=0.01, speculative=f"draft:{path}")
    assert spec.block_manager.host is not None and spec.spec.proposer.block_manager.host is None


# ---- the engine -----------------------------------------------------------------------------

PROMPTS = (" ".join(WORDS * 3), " ".join(reversed(WORDS * 3)))  # ~90 tokens each, nothing shared
PARAMS = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
          SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)]


@pytest.fixture(scope="module")
def engines(bundled_model_path) -> dict[str, tuple[LLM, LLM]]:
    """Per KV-cache dtype: an engine whose KV cache holds one prompt (7 blocks of 16 tokens) with a host
    tier, and one without."""
    out = {}
    for dtype in ("auto", "int8"):
        plain = LLM(str(bundled_model_path), dtype="float32", kv_cache_dtype=dtype, kv_cache_memory="1MiB")
        memory = 7 * plain.engine.runner.kv_cache.bytes_per_block
        plain = LLM(str(bundled_model_path), dtype="float32", kv_cache_dtype=dtype, kv_cache_memory=memory)
        out[dtype] = (LLM(str(bundled_model_path), dtype="float32", kv_cache_dtype=dtype, kv_cache_memory=memory,
                          kv_offloading_size=4.5 * memory / 2**30), plain)
    return out


def generate(llm: LLM, prompt: str, params: SamplingParams) -> list[int]:
    [out] = llm.generate([prompt], params, use_tqdm=False)
    return list(out.outputs[0].token_ids)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_prompts_evicted_to_the_host_come_back_token_identical(engines, kv_cache_dtype):
    offload, plain = engines[kv_cache_dtype]
    engine = offload.engine
    assert engine.runner.kv_cache.num_host_blocks == 31 and plain.engine.runner.kv_cache.num_host_blocks == 0
    first, other = PROMPTS
    full = len(offload.tokenizer.encode(first)) // 16  # its full blocks: the most a later request can find
    for params in PARAMS:
        expected = generate(plain, first, params)
        assert generate(offload, first, params) == expected
        generate(offload, other, params)  # takes the whole KV cache: the first prompt's blocks go to the host
        generate(plain, other, params)
        hits, loaded = engine.scheduler.prefix_hits, engine.block_manager.num_loaded_blocks
        assert generate(offload, first, params) == expected  # its KV copied back, not recomputed
        assert engine.block_manager.num_loaded_blocks - loaded >= full - 1
        assert engine.scheduler.prefix_hits - hits >= 16 * (full - 1)
        assert generate(plain, first, params) == expected  # recomputed there
    stats = engine.stats  # a block the host holds already is not copied there again when evicted again
    assert stats["kv_offloaded_blocks"] >= full - 1 and stats["kv_loaded_blocks"] >= 2 * (full - 1)
    assert_idle(engine)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_host_copies_are_bit_exact_and_done_in_order(device, kv_cache_dtype):
    layers = [Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25) for _ in range(3)]
    block = KVCachePool.block_bytes(layers, 4, torch.bfloat16, kv_cache_dtype)
    kv = KVCachePool([layers], 4, 5 * block, torch.bfloat16, kv_cache_dtype, torch.device(device),
                     host_memory=2 * block)
    assert (kv.num_blocks, kv.num_host_blocks) == (5, 2)
    assert kv.host_data.device.type == "cpu" and kv.host_data.is_pinned() == (device == "cuda")
    torch.manual_seed(0)
    kv.data.copy_(torch.randn(kv.data.shape).to(kv.dtype))
    if kv.scales is not None:
        kv.scales.copy_(torch.rand(kv.scales.shape))
    before = kv.read_blocks([0, 1, 2])
    # offload 0 and 1 (then 1 again over 0's copy), overwrite 0 with 2 (copy-on-write), bring 1's KV back
    # into 0, reuse host block 1 for 2, load both host blocks
    kv.copy_blocks([(0, ~0), (1, ~1), (1, ~0), (2, 0), (~1, 0), (2, ~1), (~0, 3), (~1, 4)])
    after = kv.read_blocks([3, 0, 4])
    expected = [1, 1, 2]  # whose KV blocks 3, 0 and 4 hold now
    for got, want in zip(after, before):
        assert (got is None and want is None) or torch.equal(got, want[:, :, expected])
