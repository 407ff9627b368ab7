"""Scheduler: token budget, chunked prefill mixed with decodes, preemption. No tensors."""
from __future__ import annotations

import random

from infera.engine.block_manager import BlockManager
from infera.engine.scheduler import ScheduledBatch, Scheduler
from infera.engine.sequence import Sequence, SequenceStatus
from infera.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget, watermark=0.0)


def seq(n: int, start: int = 0) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams())


def finish_step(s: Scheduler, batch: ScheduledBatch, token: int = 7) -> None:
    """What the engine does after a step: commit computed tokens, append sampled ones."""
    for q, n in zip(batch.seqs, batch.num_new_tokens):
        s.block_manager.commit(q, n)
        if q.num_computed_tokens == q.num_tokens:
            q.append_token(token)


def test_budget_respected_and_prefill_chunked():
    s = make(budget=16)
    a, b = seq(40), seq(10, 100)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [a] and batch.num_new_tokens == [16]
    finish_step(s, batch)
    batch = s.schedule()
    assert batch.num_tokens <= 16 and batch.num_new_tokens[0] == 16
    finish_step(s, batch)
    batch = s.schedule()  # a's last 8 tokens, then b's first 8
    assert batch.seqs == [a, b] and batch.num_new_tokens == [8, 8]


def test_decodes_go_first_and_mix_with_prefill_chunks():
    s = make(budget=8)
    a = seq(5)
    s.add(a)
    finish_step(s, s.schedule())  # a is now decoding
    b = seq(20, 50)
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7]


def test_max_num_seqs():
    s = make(max_seqs=2, budget=100)
    seqs = [seq(3, 10 * i) for i in range(4)]
    for q in seqs:
        s.add(q)
    batch = s.schedule()
    assert batch.seqs == seqs[:2] and len(s.waiting) == 2


def test_preemption_frees_blocks_and_requeues_front():
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(8), seq(8, 100)
    s.add(a)
    s.add(b)
    finish_step(s, s.schedule())  # 2 full blocks each
    assert s.block_manager.num_free_blocks == 0
    batch = s.schedule()  # each needs a 3rd block: b (admitted last) is preempted
    assert batch.seqs == [a] and s.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and s.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # the sampled token is kept and will be recomputed


def test_random_workload_respects_invariants():
    rng = random.Random(0)
    s = make(num_blocks=24, block_size=4, max_seqs=6, budget=20)
    seqs = [seq(rng.randint(1, 30), 1000 * i) for i in range(20)]
    limits = {q.seq_id: rng.randint(1, 12) for q in seqs}
    for q in seqs:
        s.add(q)
    steps = 0
    while s.has_unfinished():
        batch = s.schedule()
        steps += 1
        assert batch, "no progress"
        assert batch.num_tokens <= 20 and len(s.running) <= 6
        assert len({q.seq_id for q in batch.seqs}) == len(batch.seqs)
        for q, n in zip(batch.seqs, batch.num_new_tokens):
            assert 1 <= n <= q.num_uncomputed_tokens
            assert len(q.block_table) * 4 >= q.num_computed_tokens + n
        finish_step(s, batch, token=rng.randint(0, 50))
        for q in list(s.running):
            if q.num_output_tokens >= limits[q.seq_id]:
                s.finish(q)
        used = sum(b.ref_count for b in s.block_manager.blocks)
        assert used == sum(len(q.block_table) for q in s.running)
        assert steps < 10_000
    assert s.block_manager.num_free_blocks == 24
    assert all(q.num_output_tokens >= limits[q.seq_id] for q in seqs)


def test_finish_and_abort_free_everything():
    s = make()
    a, b = seq(10), seq(10, 100)
    s.add(a)
    s.add(b)
    finish_step(s, s.schedule())
    s.finish(a)
    s.finish(b)
    c = seq(5, 300)
    s.add(c)
    s.finish(c)  # aborted while waiting
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 64


def test_prefix_hits_counted_and_skip_compute():
    s = make(budget=64)
    a = seq(12)
    s.add(a)
    finish_step(s, s.schedule())
    b = Sequence(list(range(12)) + [77], SamplingParams())
    s.add(b)
    batch = s.schedule()
    i = batch.seqs.index(b)
    assert b.num_computed_tokens == 12 and batch.num_new_tokens[i] == 1
    assert s.prefix_hits == 12
