"""Engine replicas on Ray (``--data-parallel-size 2``): two Ray actors with one thread each behind one
front (the pool API and the HTTP server with the ``openai`` client), against one in-process engine.
One Ray cluster, pool and server serve the whole module."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from infera import LLM, SamplingParams
from infera.config import EngineConfig, ParallelConfig
from infera.outputs import CompletionOutput, RequestOutput

ray = pytest.importorskip("ray")

from infera.distributed.replica import ReplicaError  # noqa: E402 - after the skip
from infera.distributed.replica_pool import ReplicaPool, _caught_up  # noqa: E402
from infera.server.api_server import build_app  # noqa: E402
from test_server import wait_until  # noqa: E402

ENGINE = {"kv_cache_memory": "32MiB", "max_num_seqs": 16}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
LOAD = [f"Write one sentence about the number {i}:" for i in range(4)]  # the load a replica dies under
GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PREFIX = " ".join(f"rule {i}: answer briefly and cite the manual." for i in range(24))  # ~200 tokens


class Front:
    """The pool, served over HTTP; ``run`` runs a coroutine on the server's event loop."""

    def __init__(self, pool: ReplicaPool, url: str):
        self.pool, self.url = pool, url

    def run(self, coro: Coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.pool._loop).result(timeout)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def replica_stats(self, replica: int) -> dict[str, float]:
        return ray.get(self.pool.replicas[replica].health.remote(), timeout=30)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """One engine's greedy tokens for every prompt the tests send, each prompt alone (a step of 32
    rows or more multiplies on other kernels, and the tests keep their steps below that)."""
    llm = LLM(**ENGINE)
    return {p: list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p, params in [(p, GREEDY) for p in PROMPTS] + [(p, LONG) for p in LOAD]}


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = ReplicaPool(EngineConfig(**ENGINE), ParallelConfig(data_parallel_size=2, threads_per_replica=1))
        uv = uvicorn.Server(uvicorn.Config(build_app(pool, "smol"), host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        wait_until(lambda: uv.started or not thread.is_alive(), 60, "the server started")
        assert uv.started, "the server failed to start"
        yield Front(pool, f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}")
        uv.should_exit = True
        thread.join(30)
    finally:
        ray.shutdown()


async def generate(pool: ReplicaPool, prompt: str, params: SamplingParams, request_id: str
                   ) -> tuple[list[RequestOutput], int | None]:
    """Every output of one request, and the replica it was first sent to."""
    stream = await pool.add_request(prompt, params, request_id)
    replica = pool.replica_of(request_id)
    return [out async for out in stream], replica


def tokens(outs: list[RequestOutput]) -> list[int]:
    return list(outs[-1].outputs[0].token_ids)


def test_two_replicas_match_one_engine(front, reference):
    async def run() -> list[tuple[list[RequestOutput], int | None]]:
        return await asyncio.gather(*(generate(front.pool, p, GREEDY, f"same-{i}") for i, p in enumerate(PROMPTS)))

    results = front.run(run())
    assert [tokens(outs) for outs, _ in results] == [reference[p] for p in PROMPTS]
    assert {replica for _, replica in results} == {0, 1}  # both replicas served
    assert all(len(outs) > 1 for outs, _ in results)  # streamed token by token, not only the final output


def test_openai_client_through_the_replicas(front, reference):
    client = front.client()
    for prompt in PROMPTS[:2]:
        out = client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
        expected = front.pool.tokenizer.decode(reference[prompt])
        assert out.choices[0].text == expected
        assert len(out.choices[0].logprobs.tokens) == len(reference[prompt])
        chunks = client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Pick a color."}],
                                          max_tokens=16, temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].message.content.lstrip().startswith("{")  # structured output reaches the replica
    metrics = httpx.get(f"{front.url}/metrics").text
    assert 'replica="0"' in metrics and 'replica="1"' in metrics and 'replica="all"' in metrics
    assert httpx.get(f"{front.url}/health").status_code == 200


def test_cache_aware_routing_keeps_tenants_together(front):
    tenants = {"a": "You are the assistant of tenant A. " + PREFIX, "b": "You serve tenant B only. " + PREFIX[::-1]}

    async def run() -> dict[str, set[int | None]]:
        where: dict[str, set[int | None]] = {"a": set(), "b": set()}
        for turn in range(3):  # each turn, both tenants at once
            results = await asyncio.gather(*(generate(front.pool, f"{system}\nUser: question {turn}?",
                                                      SamplingParams(max_tokens=2, temperature=0), f"{t}-{turn}")
                                             for t, system in tenants.items()))
            for t, (_, replica) in zip(tenants, results):
                where[t].add(replica)
        return where

    hits = sum(front.replica_stats(r)["prefix_hits"] for r in (0, 1))
    where = front.run(run())
    assert len(where["a"]) == 1 and len(where["b"]) == 1 and where["a"] != where["b"], where
    gained = sum(front.replica_stats(r)["prefix_hits"] for r in (0, 1)) - hits
    assert gained >= 4 * 150  # the later turns of both tenants found their system prompts cached


def test_scaling_requests_run_on_one_replica(front):
    client = front.client()
    out = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is 2 + 3?"}], seed=3, temperature=1.0,
        extra_body={"scaling": {"method": "self_consistency", "budget": 3, "max_tokens": 12, "step_max_tokens": 4}})
    summary = out.model_extra["scaling"]
    assert summary["method"] == "self_consistency" and summary["budget"] == 3 and len(summary["candidates"]) == 3
    assert out.usage.completion_tokens == summary["generated_tokens"] > 0 and out.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="unknown scaling method"):
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"scaling": {"method": "mcts", "budget": 2}})
    for replica in (0, 1):
        wait_until(lambda: (s := front.replica_stats(replica))["running"] == 0 and s["waiting"] == 0, 30,
                   f"replica {replica} is idle")


def test_abort_frees_the_request_on_its_replica(front):
    async def run() -> int:
        stream = await front.pool.add_request("Count slowly:", SamplingParams(max_tokens=400, ignore_eos=True),
                                              "aborted")
        replica = front.pool.replica_of("aborted")
        async for _ in stream:
            break  # leaving the stream aborts the request
        return replica

    replica = front.run(run())
    wait_until(lambda: (s := front.replica_stats(replica))["running"] == 0 and s["waiting"] == 0
               and s["requests"] == 0, 30, "the replica dropped the aborted request")
    assert front.pool.num_requests == 0


def test_a_killed_replica_loses_no_request(front, reference):
    pool = front.pool

    async def run() -> list[list[RequestOutput]]:
        streams = [await pool.add_request(p, LONG, f"load-{i}") for i, p in enumerate(LOAD)]
        victim = pool.replica_of(streams[0].request_id)
        seen = asyncio.Event()

        async def consume(stream) -> list[RequestOutput]:
            outs = []
            async for out in stream:
                outs.append(out)
                if pool.replica_of(stream.request_id) == victim:
                    seen.set()
            return outs

        tasks = [asyncio.create_task(consume(s)) for s in streams]
        await asyncio.wait_for(seen.wait(), 30)  # the victim is generating
        ray.kill(pool.replicas[victim], no_restart=False)
        return await asyncio.wait_for(asyncio.gather(*tasks), 90)

    results = front.run(run(), timeout=120)
    # every request completed with one engine's tokens, the ones that were streaming included
    assert [tokens(outs) for outs in results] == [reference[p] for p in LOAD]
    wait_until(lambda: all(pool.router.up), 90, "the killed replica is back")

    async def again() -> set[int | None]:
        results = await asyncio.gather(*(generate(pool, p, GREEDY, f"after-{i}") for i, p in enumerate(PROMPTS)))
        assert [tokens(outs) for outs, _ in results] == [reference[p] for p in PROMPTS]
        return {replica for _, replica in results}

    assert front.run(again()) == {0, 1}


def test_replay_continues_only_the_same_tokens():
    def out(*choices: list[int], finished: bool = False) -> RequestOutput:
        return RequestOutput("r", None, [], [CompletionOutput(i, "", list(ids)) for i, ids in enumerate(choices)],
                             finished)

    delivered = out([1, 2, 3], [4, 5])
    assert _caught_up(out([1, 2], [4]), delivered) is False
    assert _caught_up(out([1, 2, 3, 9], [4, 5]), delivered) is True
    assert _caught_up(out([1, 7], [4]), delivered) is None
    assert _caught_up(out([1, 2], [4], finished=True), delivered) is None


def test_replica_errors_cross_as_values():
    from infera.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError

    for e in (ValueError("bad"), QueueFullError("busy"), EngineDeadError("dead"), RequestFailedError("x", 400)):
        back = ReplicaError.of(e).exception()
        assert type(back) is type(e) and str(back) == str(e)
    assert ReplicaError.of(RequestFailedError("x", 400)).exception().status == 400


def test_bad_data_parallel_size_is_a_cli_error(capsys):
    from infera.cli import main

    assert main(["serve", "--data-parallel-size", "0"]) == 2
    assert "--data-parallel-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="routing-policy"):
        ParallelConfig(data_parallel_size=2, routing_policy="random")
    assert main(["serve", "--data-parallel-size", "2", "--routing-cache-threshold", "1.5"]) == 2
    assert "--routing-cache-threshold must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert ParallelConfig(data_parallel_size=2, routing_cache_threshold=0.25).routing_cache_threshold == 0.25
    assert main(["serve", "--data-parallel-size", "2", "--routing-prefill-weight", "-1"]) == 2
    assert "--routing-prefill-weight must be >= 0, got -1.0" in capsys.readouterr().err
    assert ParallelConfig(data_parallel_size=2, routing_prefill_weight=2.0).routing_prefill_weight == 2.0
