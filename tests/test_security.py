"""Hostile requests end themselves, not the server (issue 21): one proof of concept per class of
advisory (vLLM, llama.cpp, SGLang, Ollama), each answered with a 4xx (413/503 where that is the
contract) in under a second, while /health keeps answering 200 and an ordinary request afterwards
succeeds.  Plus: a failed step fails only what it can attribute, the drain on SIGTERM, and
disconnects that free every block."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from infera.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncLLMEngine
from infera.engine.llm_engine import LLMEngine
from infera.server.api_server import InferaServer, build_app
from infera.server.options import ServerOptions
from test_server import CHAT, MODEL, NO_EOS, PROMPT, Server, server, wait_until  # noqa: F401  (fixture)

CC, CMPL = "/v1/chat/completions", "/v1/completions"
MARKER = Path("/tmp/infera-security-poc-marker")
CVE_2024_34359 = ("{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch " + str(MARKER)
                  + "') }}")
SUBCLASSES = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@contextmanager
def serve(engine: LLMEngine, options: ServerOptions, max_waiting_requests: int | None = None
          ) -> Iterator[tuple[Server, InferaServer]]:
    uv = InferaServer(build_app(AsyncLLMEngine(engine, max_waiting_requests), MODEL, options), "127.0.0.1", 0,
                      options.shutdown_timeout, "warning")
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started or not thread.is_alive(), 60, "the server started")
    assert uv.started, "the server failed to start"
    try:
        yield Server(f"http://127.0.0.1:{uv.port}", engine), uv
    finally:
        uv.should_exit = True
        thread.join(60)


STRICT = ServerOptions(max_tokens_default=8, max_tokens_limit=64, request_timeout=3.0,
                       max_request_body_bytes=2**20, trust_request_chat_template=True, chat_template_timeout=0.4,
                       shutdown_timeout=1.0)


@pytest.fixture(scope="module")
def strict(tiny_model) -> Iterator[Server]:
    """A server with tight operator limits, that trusts request templates (to show they stay contained)."""
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB")
    with serve(engine, STRICT, max_waiting_requests=64) as (srv, _):
        assert_still_serving(srv)
        httpx.post(f"{srv.url}{CC}", timeout=60, **chat())  # the template worker has started
        yield srv


def assert_still_serving(srv: Server) -> None:
    assert httpx.get(f"{srv.url}/health").status_code == 200
    out = httpx.post(f"{srv.url}{CMPL}", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, **NO_EOS},
                     timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def attack(srv: Server, path: str, status: int, expect: str, within: float = 1.0, **kw) -> dict:
    """Send one proof of concept; it must be refused with ``status`` naming ``expect``, within ``within`` s."""
    started = time.monotonic()
    r = httpx.post(f"{srv.url}{path}", timeout=30, **kw)
    elapsed = time.monotonic() - started
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert expect in error["message"], error
    assert elapsed < within, f"refused after {elapsed:.2f}s"
    assert_still_serving(srv)
    return error


def chat(**extra) -> dict:
    return {"json": {"model": MODEL, "messages": CHAT, "max_tokens": 4, **extra}}


# -- engine-thread death (vLLM CVE-2026-114051 class) -----------------------------------------------------------
def test_deeply_nested_schema_string(server):  # noqa: F811
    """A guided_json string nested 100,000 deep raised RecursionError on the engine thread and killed it."""
    attack(server, CMPL, 400, "nested too deeply",
           json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "guided_json": "[" * 100_000})


def test_unexpected_error_while_queueing_ends_only_that_request(server, monkeypatch):  # noqa: F811
    engine = server.engine
    original = engine.add_request

    def add_request(prompt, params, request_id=None, **kwargs):  # a request of 7 tokens is poison
        if params.max_tokens == 7:
            raise RuntimeError("boom")
        return original(prompt, params, request_id, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_request)
    attack(server, CMPL, 400, "RuntimeError: boom", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 7})
    assert not engine.requests


def test_a_failure_in_one_requests_step_ends_that_request_only(server, monkeypatch):  # noqa: F811
    """An exception while handling one sequence's step output fails its request (400 / an error
    event), while a request in the same steps runs on to the end."""
    processor = server.engine.output_processor
    original = processor.append_token

    def append_token(seq, token_id, logprobs):
        if seq.params.max_tokens == 41 and seq.num_tokens - seq.num_prompt_tokens == 5:
            raise KeyError("poison")
        return original(seq, token_id, logprobs)

    monkeypatch.setattr(processor, "append_token", append_token)

    async def run() -> tuple:
        async with server.async_client() as client:
            good = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, extra_body=NO_EOS)
            bad = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=41, extra_body=NO_EOS)
            return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(run())
    assert good.usage.completion_tokens == 40
    assert isinstance(bad, openai.BadRequestError) and "KeyError" in bad.message
    with httpx.stream("POST", f"{server.url}{CMPL}", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 41,
                                                           "stream": True, **NO_EOS}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "KeyError" in json.loads(events[-2])["error"]["message"]
    monkeypatch.undo()
    wait_until(server.idle, 30, "every block is free")
    assert_still_serving(server)


def test_repeated_step_failures_mark_the_engine_unhealthy(tiny_model, monkeypatch):
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB")
    with serve(engine, ServerOptions()) as (srv, _):
        def execute(*args):
            raise RuntimeError("bad node")

        monkeypatch.setattr(engine.runner, "execute", execute)
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            r = httpx.post(f"{srv.url}{CMPL}", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=30)
            assert r.status_code == 500 and "bad node" in r.json()["error"]["message"]
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "failed in a row" in health.json()["error"]["message"]
        r = httpx.post(f"{srv.url}{CMPL}", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=30)
        assert r.status_code == 503


# -- client-supplied templates and kwargs (GHSA-69j4-grxj-j64p, GHSA-x567-49g5-p4cf, CVE-2024-34359) --------------
@pytest.mark.parametrize("kwargs,expect", [
    ({"chat_template": NESTED_LOOP}, "'chat_template' is not allowed"),
    ({"padding": "max_length", "max_length": 10**9}, "'padding' is not allowed"),
    ({"tokenize": False}, "'tokenize' is not allowed"),
    ({"bos_token": "<evil>"}, "'bos_token' is not allowed"),
    ({"tools_list": [{"a": 1}]}, "must be null, a boolean, a number or a string"),
])
def test_chat_template_kwargs_are_an_allow_list(server, kwargs, expect):  # noqa: F811
    attack(server, CC, 400, expect, **chat(chat_template_kwargs=kwargs))


def test_request_templates_need_the_operators_trust(server):  # noqa: F811
    attack(server, CC, 400, "--trust-request-chat-template", **chat(chat_template=NESTED_LOOP))


@pytest.mark.parametrize("template,expect", [  # the loop last: the worker it kills takes ~0.7 s to replace
    ("{{ 'x' * 10**10 }}", "cannot apply the chat template"),
    (CVE_2024_34359, "cannot apply the chat template"),
    (SUBCLASSES, "cannot apply the chat template"),
    (NESTED_LOOP, "did not render within 0.4 s"),
])
def test_trusted_request_templates_stay_contained(strict, template, expect):
    MARKER.unlink(missing_ok=True)
    attack(strict, CC, 400, expect, **chat(chat_template=template))
    assert not MARKER.exists()


# -- client-chosen files (Ollama CVE-2024-39719) -----------------------------------------------------------------
@pytest.mark.parametrize("reward", ["model:/etc", "model:../../models/prm", "model:/nonexistent"])
def test_reward_models_come_from_the_operators_list(server, reward):  # noqa: F811
    error = attack(server, CC, 400, "is not served here",
                   **chat(scaling={"method": "best_of_n", "budget": 2, "reward": reward}))
    assert "/etc" not in error["message"].split("is not served")[1]  # nothing about the filesystem


def test_models_list_does_not_show_the_model_path(server):  # noqa: F811
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert str(server.engine.model_path) not in json.dumps(card)


# -- unbounded work -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,expect", [
    ({"prompt": [PROMPT] * 300}, "at most 256 per request"),
    ({"prompt": [PROMPT] * 9, "n": 128}, "choices; at most 1024"),
    ({"prompt": PROMPT, "stop": ["x"] * 65}, "at most 64 items"),
    ({"prompt": PROMPT, "stop": "s" * 5000}, "at most 1024 characters"),
    ({"prompt": PROMPT, "stop_token_ids": [1] * 5000}, "at most 1024 items"),
])
def test_lists_and_strings_are_bounded(server, body, expect):  # noqa: F811
    attack(server, CMPL, 400, expect, json={"model": MODEL, "max_tokens": 2, **body})


@pytest.mark.parametrize("constraint,expect", [
    ({"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}},
     "the limit is 512"),  # in-bound before: 235 s of compile
    ({"guided_json": {"description": "x" * 200_000}}, "too large"),
    ({"guided_regex": "(a|b)" * 10_000}, "too large"),
    ({"guided_choice": [str(i) for i in range(5000)]}, "too many options"),
])
def test_constraints_are_bounded(server, constraint, expect):  # noqa: F811
    attack(server, CMPL, 400, expect, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **constraint})


def test_a_slow_grammar_compile_times_out_and_others_stay_served(server, monkeypatch):  # noqa: F811
    """A compile past GRAMMAR_COMPILE_TIMEOUT_S is a 400; the engine thread never waits on it."""
    import infera.structured as structured

    compiler = server.engine.structured.compiler
    release = threading.Event()
    original = compiler.compiler.compile_grammar

    def compile_grammar(grammar):  # every compile takes until the test ends
        release.wait(60)
        return original(grammar)

    monkeypatch.setattr(compiler.compiler, "compile_grammar", compile_grammar)
    monkeypatch.setattr(structured.StructuredOutputManager.compile_async, "__defaults__", (0.3,))
    try:
        attack(server, CMPL, 400, "did not compile within 0.3 s",
               json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "guided_regex": "slowpoke[0-9]"})
    finally:
        release.set()
    assert not server.engine.requests  # it never reached the engine

@pytest.mark.parametrize("pattern,expect", [
    (r"(a)\1", "RE2"),
    ("(?=x)a", "RE2"),
    ("a" * 2000, "the limit is 1024"),
])
def test_answer_patterns_run_on_a_linear_time_engine(server, pattern, expect):  # noqa: F811
    attack(server, CC, 400, expect,
           **chat(scaling={"method": "self_consistency", "budget": 2, "answer_pattern": pattern}))


def test_catastrophic_backtracking_pattern_runs_in_linear_time():
    from infera.scaling.answers import AnswerExtractor

    started = time.monotonic()
    assert AnswerExtractor(r"(a+)+$", fallback_last_number=False)("a" * 100_000 + "!") is None
    assert time.monotonic() - started < 1.0  # Python's re takes longer than the universe has


@pytest.mark.parametrize("scaling,expect", [
    ({"budget": 1024, "max_tokens": 2000}, "at most 1048576 per request"),
    ({"budget": 2, "max_steps": 10**9}, "at most the context length"),
])
def test_scaling_work_is_bounded(server, scaling, expect):  # noqa: F811
    attack(server, CC, 400, expect, **chat(scaling={"method": "self_consistency", **scaling}))


def test_request_body_is_bounded(strict):
    attack(strict, CMPL, 413, "--max-request-body-bytes",
           json={"model": MODEL, "prompt": "x" * (STRICT.max_request_body_bytes + 1)})

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(STRICT.max_request_body_bytes // 2**16 + 1):
            yield b"x" * 2**16
        yield b'"}'

    attack(strict, CMPL, 413, "--max-request-body-bytes", content=chunks(),
           headers={"content-type": "application/json"})


# -- runaway defaults ---------------------------------------------------------------------------------------------
def test_max_tokens_default_and_limit(strict):
    out = httpx.post(f"{strict.url}{CC}", json={"model": MODEL, "messages": CHAT, **NO_EOS}, timeout=30).json()
    assert out["usage"]["completion_tokens"] == STRICT.max_tokens_default
    attack(strict, CC, 400, "--max-tokens-limit", **chat(max_tokens=STRICT.max_tokens_limit + 1))


def test_request_deadline(strict, monkeypatch):
    """A request still running at --request-timeout ends with a 408 (streamed: an error event)."""
    engine = strict.engine
    original = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.1) or original())  # 10 tokens/s at most
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 64, **NO_EOS}
    started = time.monotonic()
    r = httpx.post(f"{strict.url}{CMPL}", json=body, timeout=30)
    assert r.status_code == 408 and "--request-timeout" in r.json()["error"]["message"]
    assert STRICT.request_timeout <= time.monotonic() - started < STRICT.request_timeout + 1
    with httpx.stream("POST", f"{strict.url}{CMPL}", json={**body, "stream": True}, timeout=30) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    monkeypatch.undo()
    wait_until(strict.idle, 30, "the timed-out requests were aborted")


# -- smaller gaps -------------------------------------------------------------------------------------------------
def test_dns_rebinding_host_is_refused(server):  # noqa: F811
    attack(server, CMPL, 400, "is not served here", headers={"Host": "attacker.example:8000"},
           json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert httpx.get(f"{server.url}/health", headers={"Host": "localhost:1"}).status_code == 200


def test_waiting_bound_counts_grammar_waits_and_searches(tiny_model):
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB")
    with serve(engine, ServerOptions(), max_waiting_requests=1) as (srv, uv):
        engine.structured.waiting.append(object())  # as a sequence waiting for its grammar to compile
        try:
            uv.engine.abort("none")  # wakes the idle engine thread, which takes a fresh stats snapshot
            wait_until(lambda: srv.metrics()["infera:num_requests_waiting"] == 1, 10, "the waiting count shows it")
            for body in ({"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
                         {"model": MODEL, "messages": CHAT, "scaling": {"method": "self_consistency", "budget": 2}}):
                path = CMPL if "prompt" in body else CC
                r = httpx.post(f"{srv.url}{path}", json=body, timeout=30)
                assert r.status_code == 503 and "--max-waiting-requests" in r.json()["error"]["message"], r.text
        finally:
            engine.structured.waiting.clear()


def test_sigterm_drains_then_ends_streams_with_an_error_event(tiny_model):
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="16MiB")
    options = ServerOptions(shutdown_timeout=1.0)
    with serve(engine, options) as (srv, uv):
        original = engine.step
        engine.step = lambda: time.sleep(0.02) or original()  # a long request: 1800 tokens at most 50/s
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1800, "stream": True, **NO_EOS}
        events: list[str] = []
        with httpx.stream("POST", f"{srv.url}{CMPL}", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                if len(events) == 3:
                    signaled = time.monotonic()
                    uv.handle_exit(signal.SIGTERM, None)
        ended = time.monotonic() - signaled
        assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
        assert options.shutdown_timeout <= ended < options.shutdown_timeout + 3
        assert all("choices" in json.loads(e) for e in events[:-2])
        wait_until(lambda: not engine.requests, 10, "the request was aborted")
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks


# -- disconnects free every block ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speculative(tiny_model) -> Iterator[Server]:
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB",
                       speculative="ngram")
    with serve(engine, ServerOptions()) as (srv, _):
        yield srv


@pytest.mark.parametrize("extra", [{"n": 3}, {"guided_json": {"type": "object"}}, {}],
                         ids=["n3", "structured", "speculative"])
def test_disconnected_streams_free_every_block(speculative, extra):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1500, "stream": True, **extra}
    for _ in range(3):
        with httpx.stream("POST", f"{speculative.url}{CC}", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 6:
                    break
    wait_until(speculative.idle, 30, "the disconnected requests were aborted")
    bm = speculative.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert_still_serving(speculative)


def test_disconnected_scaling_request_frees_every_block(speculative, monkeypatch):
    original = speculative.engine.step
    monkeypatch.setattr(speculative.engine, "step", lambda: time.sleep(0.02) or original())  # it outlasts 1 s
    body = {"model": MODEL, "messages": CHAT, "scaling": {"method": "self_consistency", "budget": 8,
                                                          "max_tokens": 1500}, **NO_EOS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{speculative.url}{CC}", json=body, timeout=1.0)
    wait_until(speculative.idle, 30, "the search was cancelled")
    bm = speculative.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    monkeypatch.undo()
    assert_still_serving(speculative)
