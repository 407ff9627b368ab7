"""Disaggregated prefill and decode on Ray (``--prefill-replicas 1 --decode-replicas 1``, one thread
each, int8 KV): the pair's outputs equal one colocated engine's token for token (greedy, seeded n > 1,
structured output, prompts with and without prefix hits); the decode replica takes the prompt's
blocks from the prefill replica; a dead prefill replica costs only recomputation; a dead decode
replica ends its streams with a clear error and no blocks stay held on either side.
(The float cache's transfer is tested in-process: tests/test_kv_connector.py.)"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from infera import LLM, SamplingParams
from infera.config import EngineConfig, ParallelConfig
from infera.engine.async_engine import EngineDeadError, RequestFailedError
from infera.sampling_params import StructuredOutputParams

ray = pytest.importorskip("ray")

from infera.distributed.replica_pool import ReplicaPool  # noqa: E402 - after the skip
from test_replicas import PREFIX  # noqa: E402
from test_server import wait_until  # noqa: E402

ENGINE = {"kv_cache_memory": "32MiB", "max_num_seqs": 16, "kv_cache_dtype": "int8", "dtype": "float32"}
SYSTEM = "You are a helpful assistant. " + PREFIX  # ~200 tokens: 12 full blocks
REQUESTS = [
    (SYSTEM + "\nUser: what is the first rule?", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
    (SYSTEM + "\nUser: and the last one?", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
    ("Hi", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),  # shorter than a block: decode alone
    (SYSTEM + "\nUser: three words", SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)),
    (SYSTEM + "\nUser: answer in JSON", SamplingParams(max_tokens=24, temperature=0,
                                                       structured=StructuredOutputParams(json_object=True))),
]


def texts(out) -> list[list[int]]:
    return [list(c.token_ids) for c in out.outputs]


@pytest.fixture(scope="module")
def reference() -> list[list[list[int]]]:
    llm = LLM(**ENGINE)
    return [texts(llm.generate([p], params, use_tqdm=False)[0]) for p, params in REQUESTS]


class Pair:
    def __init__(self, pool: ReplicaPool, loop: asyncio.AbstractEventLoop):
        self.pool, self.loop = pool, loop

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self, actor) -> dict[str, float]:
        return ray.get(actor.health.remote(), timeout=30)

    def idle(self, actor) -> bool:
        s = self.stats(actor)
        return s["running"] == 0 and s["waiting"] == 0 and s["requests"] == 0 and s["kv_cache_usage"] == 0


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        pool = ReplicaPool(EngineConfig(**ENGINE), ParallelConfig(prefill_replicas=1, decode_replicas=1))
        loop.call_soon_threadsafe(pool.start)
        wait_until(lambda: pool._loop is not None, 10, "the pool started")
        yield Pair(pool, loop)
        pool.shutdown()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        ray.shutdown()


async def collect(pool: ReplicaPool, prompt: str, params: SamplingParams, request_id: str):
    stream = await pool.add_request(prompt, params, request_id)
    outs = [out async for out in stream]
    return outs[-1]


def test_pair_matches_one_engine(pair, reference):
    pool = pair.pool
    decode, prefill = pool.replicas[0], pool.prefill.actors[0]
    hits = pair.stats(decode)["prefix_hits"]

    async def run():
        first = [await collect(pool, p, params, f"r{i}") for i, (p, params) in enumerate(REQUESTS[:1])]
        return first + list(await asyncio.gather(*(collect(pool, p, params, f"r{i}")
                                                   for i, (p, params) in enumerate(REQUESTS) if i)))

    outs = pair.run(run())
    assert [texts(o) for o in outs] == reference
    moved = pool.stats
    assert moved["kv_transfer_requests"] == 4  # all but the short prompt
    assert moved["kv_transfer_blocks"] >= 4 * 12 and moved["kv_transfer_bytes"] > 0
    # the decode replica took the transferred blocks as prefix hits and computed only the tails
    gained = pair.stats(decode)["prefix_hits"] - hits
    assert gained >= 4 * 12 * 16
    # the prefill replica's prefix cache served the shared system prompt after the first request
    assert pair.stats(prefill)["prefix_hits"] >= 3 * 12 * 16
    wait_until(lambda: pair.idle(decode) and pair.idle(prefill), 30, "both replicas hold no block")


def test_dead_prefill_replica_costs_only_recomputation(pair, reference):
    pool = pair.pool
    ray.kill(pool.prefill.actors[0], no_restart=False)
    async def run():
        return await asyncio.gather(*(collect(pool, p, params, f"after-prefill-kill-{i}")
                                      for i, (p, params) in enumerate(REQUESTS[:2])))

    outs = pair.run(run())
    assert [texts(o) for o in outs] == reference[:2]
    wait_until(lambda: all(pool.prefill.router.up), 90, "the prefill replica is back")
    out = pair.run(collect(pool, *REQUESTS[0], "after-prefill-back"))
    assert texts(out) == reference[0]


def test_dead_decode_replica_ends_its_streams_with_an_error(pair):
    pool = pair.pool

    async def run() -> BaseException | None:
        stream = await pool.add_request(SYSTEM, SamplingParams(max_tokens=400, ignore_eos=True), "doomed")
        try:
            async for out in stream:
                if len(out.outputs[0].token_ids) == 1:  # streaming: the decode replica dies
                    ray.kill(pool.replicas[0], no_restart=False)
        except (EngineDeadError, RequestFailedError) as e:
            return e
        return None

    error = pair.run(run())
    assert error is not None and "replica" in str(error)
    wait_until(lambda: all(pool.router.up), 90, "the decode replica is back")
    wait_until(lambda: pair.idle(pool.replicas[0]) and pair.idle(pool.prefill.actors[0]), 30,
               "no block held on either side")
    assert pool.num_requests == 0


def test_disaggregation_flags():
    assert ParallelConfig(prefill_replicas=1, decode_replicas=2).uses_ray
    with pytest.raises(ValueError, match="go together"):
        ParallelConfig(prefill_replicas=1)
    with pytest.raises(ValueError, match="leave it at 1"):
        ParallelConfig(prefill_replicas=1, decode_replicas=1, data_parallel_size=2)
