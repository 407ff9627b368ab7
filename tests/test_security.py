"""Hostile requests end themselves, not the server (issue 21, first part): each proof of concept is
answered 4xx, /health keeps answering 200 and an ordinary request afterwards succeeds."""
from __future__ import annotations

import httpx
import pytest

from test_server import MODEL, PROMPT, server  # noqa: F401  (the module's server fixture)


def assert_still_serving(server) -> None:  # noqa: F811
    assert httpx.get(f"{server.url}/health").status_code == 200
    out = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3},
                     timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def test_deeply_nested_schema_string_is_a_400(server):  # noqa: F811
    """A guided_json string nested 100,000 deep raised RecursionError on the engine thread and killed it."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "guided_json": "[" * 100_000}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert_still_serving(server)


def test_unexpected_error_while_queueing_ends_only_that_request(server, monkeypatch):  # noqa: F811
    engine = server.engine
    original = engine.add_request

    def add_request(prompt, params, request_id=None, **kwargs):  # a request of 7 tokens is poison
        if params.max_tokens == 7:
            raise RuntimeError("boom")
        return original(prompt, params, request_id, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_request)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 7},
                   timeout=60)
    assert r.status_code == 400 and "RuntimeError: boom" in r.json()["error"]["message"]
    assert not engine.requests
    assert_still_serving(server)
