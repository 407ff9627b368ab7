"""The server's ``scaling`` extra on chat completions, through the official ``openai`` client."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from infera.engine.async_engine import AsyncLLMEngine
from infera.engine.llm_engine import LLMEngine
from infera.server.api_server import build_app
from test_server import MODEL, Server, wait_until

MESSAGES = [{"role": "user", "content": "What is 2 + 2? Give the answer in \\boxed{}."}]
OPTIONS = {"step_max_tokens": 3, "max_tokens": 9}


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[Server]:
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB")
    app = build_app(AsyncLLMEngine(engine), MODEL)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started or not thread.is_alive(), 60, "the server started")
    assert uv.started, "the server failed to start"
    yield Server(f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", engine)
    uv.should_exit = True
    thread.join(30)


def test_scaling_round_trip(server):
    client = server.client()
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=4, temperature=1.0,
        extra_body={"scaling": {"method": "particle_filtering", "budget": 4, "reward": "arithmetic", **OPTIONS}})
    summary = out.model_extra["scaling"]
    assert summary["method"] == "particle_filtering" and summary["budget"] == 4
    assert len(summary["candidates"]) >= 1 and all(len(c["step_scores"]) == 3 for c in summary["candidates"])
    assert out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == summary["generated_tokens"] > 0
    assert summary["prefill_tokens"] > 0 and summary["cached_tokens"] > 0
    # the same seed gives the same search
    again = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=4, temperature=1.0,
        extra_body={"scaling": {"method": "particle_filtering", "budget": 4, "reward": "arithmetic", **OPTIONS}})
    assert again.choices[0].message.content == out.choices[0].message.content
    wait_until(server.idle, 30, "the server is idle with an empty KV cache")


def test_scaling_beside_plain_requests(server):
    client = server.client()
    results: dict[str, object] = {}

    def scaled() -> None:
        results["scaled"] = client.chat.completions.create(
            model=MODEL, messages=MESSAGES,
            extra_body={"scaling": {"method": "self_consistency", "budget": 3, **OPTIONS}})

    thread = threading.Thread(target=scaled)
    thread.start()
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    thread.join(120)
    assert plain.choices[0].message.content is not None and "scaling" not in (plain.model_extra or {})
    assert results["scaled"].model_extra["scaling"]["method"] == "self_consistency"
    wait_until(server.idle, 30, "the server is idle with an empty KV cache")


@pytest.mark.parametrize("scaling, message", [
    ({"method": "mcts", "budget": 4}, "unknown scaling method 'mcts'"),
    ({"method": "best_of_n", "budget": 0}, "scaling.budget"),
    ({"method": "best_of_n", "budget": 4, "reward": "oracle"}, "unknown reward source 'oracle'"),
    ({"method": "best_of_n", "budget": 4, "reward": "model:/etc"}, "is not served here"),
    ({"method": "best_of_n", "budget": 4}, "best_of_n needs a reward"),
    ({"method": "beam_search", "budget": 4, "reward": "arithmetic", "beam_width": 9, **OPTIONS}, "beam_width"),
    ({"method": "beam_search", "budget": 4, "reward": "arithmetic", "beam_widht": 2}, "unknown option"),
    ({"method": "self_consistency", "budget": 4, "stop": "esc", "stop_window": 0}, "stop_window"),
    ({"method": "beam_search", "budget": 4, "reward": "arithmetic", "stop": "esc"}, "sampling methods"),
])
def test_bad_scaling_requests_are_400(server, scaling, message):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"scaling": scaling})
    assert info.value.status_code == 400 and message in info.value.message
    wait_until(server.idle, 30, "the server is idle with an empty KV cache")


def test_scaling_refuses_streaming(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": MESSAGES, "stream": True, "scaling": {"method": "self_consistency", "budget": 2}})
    assert r.status_code == 400 and "scaling takes a single non-streamed choice" in r.json()["error"]["message"]
