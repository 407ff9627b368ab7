"""Block manager: pure bookkeeping, no tensors."""
from __future__ import annotations

import pytest

from infera.engine.block_manager import BlockManager
from infera.engine.sequence import Sequence
from infera.sampling_params import SamplingParams


def seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def run(bm: BlockManager, s: Sequence) -> None:
    """Allocate and 'compute' all pending tokens of s."""
    n = s.num_uncomputed_tokens
    assert bm.allocate_slots(s, n)
    bm.commit(s, n)


def test_allocate_and_free_counts():
    bm = BlockManager(8, 4)
    s = seq(list(range(10)))
    run(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocation_fails_without_side_effects():
    bm = BlockManager(2, 4)
    s = seq(list(range(12)))
    assert not bm.allocate_slots(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_only():
    bm = BlockManager(16, 4)
    a = seq(list(range(10)))  # blocks [0..3] [4..7] full, [8,9] partial
    run(bm, a)
    b = seq(list(range(10)) + [99, 98])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, 4, hits)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.blocks[x].ref_count for x in hits] == [2, 2]
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared by hash


def test_prefix_hit_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq(list(range(8)))
    run(bm, a)
    same = seq(list(range(8)))
    assert len(bm.get_computed_blocks(same)) == 1  # the last block is recomputed to get logits


def test_hash_chain_depends_on_prefix():
    bm = BlockManager(16, 4)
    run(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block equal, first differs
    assert bm.get_computed_blocks(other) == []


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 4)
    a = seq(list(range(9)))
    run(bm, a)
    cached = list(a.block_table[:2])
    bm.free(a)
    b = seq(list(range(9)))
    assert bm.get_computed_blocks(b) == cached
    # filling the pool with other content evicts them (least recently freed first)
    c = seq([100 + i for i in range(16)])
    run(bm, c)
    assert bm.get_computed_blocks(b) == []
    bm.free(c)


def test_eviction_prefers_tail_blocks():
    bm = BlockManager(4, 4)
    a = seq(list(range(13)))  # 4 blocks: 3 full + 1 partial
    run(bm, a)
    bm.free(a)
    x = seq([500, 501])
    run(bm, x)  # takes one free block: the tail one, not the head of a's prefix
    hits = bm.get_computed_blocks(seq(list(range(13))))
    assert len(hits) == 3


def test_fork_shares_and_copy_on_write():
    bm = BlockManager(16, 4)
    parent = seq(list(range(6)))  # one full block + a partial block holding 2 tokens
    run(bm, parent)
    child = Sequence(parent.token_ids, parent.params)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    parent.append_token(7)
    child.append_token(8)
    assert bm.allocate_slots(parent, 1)  # writes into the shared partial block: copy it
    assert bm.pending_copies == [(child.block_table[1], parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[1] != child.block_table[1]
    assert bm.allocate_slots(child, 1)  # now the only owner: writes in place
    assert len(bm.pending_copies) == 1
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 16


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(16, 4)
    parent = seq(list(range(8)))
    run(bm, parent)
    child = Sequence(parent.token_ids, parent.params)
    bm.fork(parent, child)
    for s, t in ((parent, 1), (child, 2)):
        s.append_token(t)
        assert bm.allocate_slots(s, 1)
    assert bm.pending_copies == []
    assert parent.block_table[2] != child.block_table[2]


def test_truncate_releases_tail_and_unhashes_partial():
    bm = BlockManager(16, 4)
    s = seq(list(range(12)))
    run(bm, s)
    last = s.block_table[2]
    assert bm.blocks[last].hash is not None
    bm.truncate(s, 10)
    assert len(s.block_table) == 3 and s.num_computed_tokens == 10
    assert bm.blocks[last].hash is None  # will be written again
    bm.truncate(s, 4)
    assert len(s.block_table) == 1 and bm.num_free_blocks == 15


@pytest.mark.parametrize("bad", [(0, 4), (4, 0)])
def test_rejects_empty_pool(bad):
    with pytest.raises(ValueError):
        BlockManager(*bad)
