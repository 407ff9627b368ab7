"""KV connector: a prompt's KV blocks sent from one engine and received by another round-trip
bit-exactly, are found there as prefix hits, and leave the receiver's output token-identical to an
engine that computed the prompt itself (greedy and seeded sampling, float and int8 caches)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from infera import LLM, SamplingParams
from infera.engine.block_manager import BlockManager
from test_engine import WORDS, assert_idle

PROMPT = " ".join(WORDS * 2)  # ~60 tokens: 3 full blocks of 16 and a partial one
PARAMS = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)]


def uncached(llm: LLM, ids: list[int], params: SamplingParams) -> list[int]:
    """What ``llm`` makes computing the whole prompt itself (its prefix cache off)."""
    llm.engine.block_manager.enable_prefix_caching = False
    try:
        return tokens(llm, ids, params)
    finally:
        llm.engine.block_manager.enable_prefix_caching = True


def tokens(llm: LLM, ids: list[int], params: SamplingParams) -> list[int]:
    [out] = llm.generate([ids], params, use_tqdm=False)
    return list(out.outputs[0].token_ids)


def blocks_of(llm: LLM, ids: list[int]) -> torch.Tensor:
    engine = llm.engine
    data, _ = engine.runner.kv_cache.read_blocks(engine.block_manager.cached_prefix(ids))
    return data


@pytest.fixture(scope="module")
def pairs(bundled_model_path) -> dict[str, tuple[LLM, LLM]]:
    """A sender and a receiver engine per KV-cache dtype."""
    kw = dict(dtype="float32", kv_cache_memory="32MiB")
    return {dtype: (LLM(str(bundled_model_path), kv_cache_dtype=dtype, **kw),
                    LLM(str(bundled_model_path), kv_cache_dtype=dtype, **kw)) for dtype in ("auto", "int8")}


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_transfer_round_trips_and_continues_identically(pairs, kv_cache_dtype):
    sender, receiver = pairs[kv_cache_dtype]
    ids = sender.tokenizer.encode(PROMPT)
    bs = sender.engine.config.block_size
    prefix = ids[:(len(ids) - 1) // bs * bs]  # the blocks a request for `ids` can take from the cache
    tokens(sender, prefix, SamplingParams(max_tokens=1))  # the prefill side: computes and caches them
    transfer = sender.engine.worker.kv_connector.send(ids)
    assert transfer is not None and transfer.num_blocks == len(prefix) // bs
    assert transfer.token_ids == prefix
    assert (transfer.scales is not None) == (kv_cache_dtype == "int8")

    connector = receiver.engine.worker.kv_connector
    assert connector.receive(transfer) == transfer.num_blocks
    assert connector.receive(transfer) == 0  # already cached: nothing written twice
    assert torch.equal(blocks_of(receiver, ids), blocks_of(sender, ids))  # bit-exact, scales included
    again = connector.send(ids)
    assert again.data.tobytes() == transfer.data.tobytes()
    if transfer.scales is not None:
        assert again.scales.tobytes() == transfer.scales.tobytes()

    hits = receiver.engine.scheduler.prefix_hits
    for params in PARAMS:
        assert tokens(receiver, ids, params) == uncached(sender, ids, params)
    assert receiver.engine.scheduler.prefix_hits - hits == 2 * len(prefix)  # the prompt came from the transfer
    assert_idle(receiver.engine)


def test_transfer_of_another_layout_is_refused(pairs):
    flt, q8 = pairs["auto"][0], pairs["int8"][1]
    ids = flt.tokenizer.encode("another prompt, long enough to fill a block or two of the cache: " * 3)
    tokens(flt, ids, SamplingParams(max_tokens=1))
    transfer = flt.engine.worker.kv_connector.send(ids)
    with pytest.raises(ValueError, match="do not fit this cache"):
        q8.engine.worker.kv_connector.receive(transfer)
    assert q8.engine.block_manager.cached_prefix(ids) == []
    cut = dataclasses.replace(transfer, token_ids=transfer.token_ids + list(range(flt.engine.config.block_size)))
    with pytest.raises(ValueError, match="expected"):  # a block more than its bytes
        flt.engine.worker.kv_connector.receive(cut)
    assert flt.engine.worker.kv_connector.send([1, 2, 3]) is None  # nothing cached: nothing to send


def test_received_blocks_are_cached_free_and_evictable():
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = [5, 6, 7, 8, 9, 10, 11]
    new = bm.add_cached_blocks(ids)
    assert [i for i, _ in new] == [0, 1, 2]  # full blocks only
    assert bm.cached_prefix(ids) == [b for _, b in new]
    assert bm.num_free_blocks == 4  # cached, not held
    assert bm.add_cached_blocks(ids[:4]) == []
    # a longer chain than the cache holds keeps the prefix that fits and never evicts its own blocks
    bm2 = BlockManager(num_blocks=2, block_size=2)
    assert [i for i, _ in bm2.add_cached_blocks(ids)] == [0, 1]
    assert len(bm2.cached_prefix(ids)) == 2
    # received blocks go when the space is needed, oldest first
    bm3 = BlockManager(num_blocks=3, block_size=2)
    bm3.add_cached_blocks([1, 2, 3, 4])
    bm3.add_cached_blocks([9, 9])
    assert bm3.cached_prefix([1, 2, 3, 4]) and bm3.cached_prefix([9, 9])
    bm3.add_cached_blocks([7, 7, 8, 8])  # needs two: evicts the [1, 2], [3, 4] chain's head first
    assert bm3.cached_prefix([1, 2, 3, 4]) == [] and len(bm3.cached_prefix([7, 7, 8, 8])) == 2
    assert len(bm3.cached_prefix([9, 9])) == 1

