"""The OpenAI-compatible server end to end: a real uvicorn server on a free loopback port, over
the tiny fp32 Llama, driven by the official ``openai`` client (and raw HTTP for malformed input)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from infera import SamplingParams
from infera.engine.async_engine import AsyncLLMEngine, run_on_fresh_thread
from infera.engine.llm_engine import LLMEngine
from infera.server.api_server import build_app

MODEL = "tiny"
PROMPT = "The engine schedules every sequence in blocks"
CHAT = [{"role": "user", "content": "Say something about caches."}]
NO_EOS = {"ignore_eos": True}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, url: str, engine: LLMEngine):
        self.url = url
        self.engine = engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics by name (labels dropped; the server has one model)."""
        text = httpx.get(f"{self.url}/metrics").text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    def idle(self) -> bool:
        m = self.metrics()
        return (m["infera:num_requests_running"] == 0 and m["infera:num_requests_waiting"] == 0
                and m["infera:kv_cache_usage_perc"] == 0)

    def tokenize(self, **body) -> list[int]:
        return httpx.post(f"{self.url}/tokenize", json=body).json()["tokens"]


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


# -- basics -------------------------------------------------------------------------------
def test_models_health_openapi(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_tokenize_detokenize_roundtrip(server):
    ids = server.tokenize(prompt=PROMPT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    chat_ids = server.tokenize(messages=CHAT)
    assert len(chat_ids) > len(server.tokenize(prompt=CHAT[0]["content"]))


def test_completion_usage_and_finish(server):
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                                              extra_body=NO_EOS)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(server.tokenize(prompt=PROMPT))
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_completion_stream_equals_non_stream(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_stream_ends_with_done(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_usage_stream_and_non_stream(server):
    client = server.client()
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                          extra_body=NO_EOS)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(server.tokenize(messages=CHAT))
    assert full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_max_completion_tokens(server):
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3


def test_n3_and_several_prompts(server):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=6, seed=1, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens == 18
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, n=3, max_tokens=4, seed=1, extra_body=NO_EOS)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2] and chat.usage.completion_tokens == 12
    two = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], n=2, max_tokens=3,
                                    temperature=0, extra_body=NO_EOS)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == len(server.tokenize(prompt=PROMPT)) + len(server.tokenize(prompt="Hello there"))
    alone = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0,
                                      extra_body=NO_EOS)
    assert {c.text for c in two.choices if c.index >= 2} == {alone.choices[0].text}
    streamed = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], max_tokens=3, temperature=0,
                                         stream=True, extra_body=NO_EOS)
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts[1] == alone.choices[0].text


def test_token_id_prompt_matches_text_prompt(server):
    client = server.client()
    ids = server.tokenize(prompt=PROMPT)
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_completion_logprobs(server):
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                              extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the chosen token is the top one
        assert top[token] == pytest.approx(value, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                   logprobs=3, stream=True, extra_body=NO_EOS)
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs(server):
    out = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    plain = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_stop_string(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body=NO_EOS).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {full!r}"
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body=NO_EOS).choices[0]
    assert out.finish_reason == "stop" and out.text == full[:full.find(stop)]
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                       stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.text


def test_seed_reproducible(server):
    client = server.client()

    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                         extra_body=NO_EOS).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    chat = [client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, seed=3, n=2,
                                           extra_body=NO_EOS) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]


def test_greedy_equals_llm_generate(server, tiny_llm):
    params = SamplingParams(temperature=0.0, max_tokens=16)
    offline = tiny_llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    served = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert served.choices[0].text == offline.text
    assert served.usage.completion_tokens == len(offline.token_ids)
    offline_chat = tiny_llm.chat(CHAT, params, use_tqdm=False)[0].outputs[0]
    served_chat = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert served_chat.choices[0].message.content == offline_chat.text


def test_return_token_ids(server, tiny_llm):
    """vLLM's return_token_ids: a client can continue from the exact tokens, not re-tokenized text."""
    params = SamplingParams(temperature=0.0, max_tokens=12)
    offline = tiny_llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    client = server.client()
    extra = {"return_token_ids": True}
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    choice = done.choices[0].model_extra
    assert choice["prompt_token_ids"] == server.tokenize(prompt=PROMPT)
    assert choice["token_ids"] == list(offline.token_ids)
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body=extra)
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == list(offline.token_ids)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, extra_body=extra)
    assert chat.model_extra["prompt_token_ids"] == server.tokenize(messages=CHAT)
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].model_extra.get("token_ids") is None


def test_structured_output_request_mapping():
    from infera.server.protocol import ChatCompletionRequest

    def structured(**kw):
        return ChatCompletionRequest(messages=CHAT, **kw).structured()

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert structured(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                            "strict": True}}).json == schema
    assert structured(response_format={"type": "json_object"}).json_object
    assert structured(response_format={"type": "text"}) is None
    assert structured(guided_regex="[ab]+").regex == "[ab]+"
    assert structured(guided_choice=["yes", "no"]).choice == ["yes", "no"]
    assert structured(guided_grammar="root ::= \"a\"").grammar == "root ::= \"a\""
    assert structured(guided_json=schema).json == schema
    assert structured() is None


def test_structured_output_through_the_server(server):
    import jsonschema

    client = server.client()
    choice = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, n=2, seed=0,
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert {c.message.content for c in choice.choices} <= {"yes", "no"}
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError) as e:  # the engine refuses the constraint: a 400 naming it
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"guided_regex": "(["})
    assert e.value.body["param"] == "guided_regex"


# -- errors -------------------------------------------------------------------------------
C, CC = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    (C, b'{"prompt": "hi", ', 400, None),
    (C, b"", 400, None),
    (C, [1, 2], 400, None),
    (C, {"max_tokens": 5}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (C, {"prompt": "hi", "n": 1000}, 400, "n"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    (C, {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "hi", "stop": 5}, 400, "stop"),
    (C, {"prompt": "hi", "suffix": "tail"}, 400, None),
    (C, {"prompt": "hi", "best_of": 3}, 400, None),
    (C, {"prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None),
    (C, {"prompt": []}, 400, None),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": [5, 99999999]}, 400, "prompt"),
    (C, {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    (CC, {"messages": []}, 400, "messages"),
    (CC, {"model": MODEL}, 400, "messages"),
    (CC, {"messages": "hi"}, 400, "messages"),
    (CC, {"messages": [{"role": "function", "content": "x"}]}, 400, "messages.0.role"),
    (CC, {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    (CC, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    (CC, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CC, {"messages": MSG, "top_logprobs": 2}, 400, None),
    # tool_choice auto (the default with tools) on a model whose template shows no tool format
    (CC, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    (CC, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CC, {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (CC, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CC, {"messages": MSG, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
     "response_format"),
    (CC, {"messages": MSG, "guided_choice": []}, 400, "guided_choice"),
    (CC, {"messages": MSG, "chat_template_kwargs": {"tokenize": False}}, 400, "chat_template_kwargs"),
    (CC, {"messages": MSG, "model": "gpt-9"}, 404, "model"),
    ("/tokenize", {}, 400, None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_request_answers_openai_error(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_route_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405


def test_context_length_errors_state_both_numbers(server):
    client = server.client()
    limit = server.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[100] * (limit + 52), max_tokens=4)
    assert e.value.status_code == 400 and str(limit + 52) in e.value.message and str(limit) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[100] * (limit - 20), max_tokens=100)
    assert str(limit - 20 + 100) in e.value.message and str(limit) in e.value.message
    long_chat = [{"role": "user", "content": "cache " * limit}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long_chat)
    assert str(limit) in e.value.message and e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT)


# -- load, disconnects, metrics -------------------------------------------------------------
def test_64_concurrent_streaming_chats(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i} about caches."}],
            max_tokens=8, temperature=0.8, seed=i, logprobs=True, stream=True,
            stream_options={"include_usage": True}, extra_body=NO_EOS)
        tokens, usage, finish = 0, 0, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                tokens += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
                finish = c.finish_reason or finish
        return tokens, usage, finish

    async def run() -> list:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(run()) == [(8, 8, "length")] * 64
    wait_until(server.idle, 30, "no request runs and the KV cache is empty")


def test_16_disconnected_streams_are_aborted(server):
    before = server.metrics()["infera:generation_tokens_total"]

    async def cut(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Story {i}, please."}], max_tokens=1500,
            stream=True, extra_body=NO_EOS)
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.close()
        return received

    async def run() -> list[int]:
        async with server.async_client() as client:
            return await asyncio.gather(*(cut(client, i) for i in range(16)))

    assert asyncio.run(run()) == [3] * 16
    wait_until(server.idle, 30, "the disconnected requests were aborted and their blocks freed")
    generated = server.metrics()["infera:generation_tokens_total"] - before
    assert generated < 16 * 1500 / 2, "the aborted requests ran on"
    bm = server.engine.block_manager  # the engine thread is idle now: every block is back
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    out = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 4


def test_non_streaming_client_timeout_aborts(server):
    before = server.metrics()["infera:generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=0.5,
                   json={"prompt": PROMPT, "max_tokens": 1800, "ignore_eos": True})
    wait_until(server.idle, 30, "the abandoned request was aborted")
    assert server.metrics()["infera:generation_tokens_total"] - before < 1800


def test_metrics_exposed(server):
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body=NO_EOS)
    m = server.metrics()
    for name in ("infera:prompt_tokens_total", "infera:generation_tokens_total", "infera:prefix_cache_queries_total",
                 "infera:time_to_first_token_seconds_count", "infera:inter_token_latency_seconds_count",
                 "infera:e2e_request_latency_seconds_count"):
        assert m[name] > 0, name
    assert m["infera:prefix_cache_hits_total"] <= m["infera:prefix_cache_queries_total"]
    assert "infera:num_preemptions_total" in m and "infera:kv_cache_usage_perc" in m


def test_bench_serve_against_the_server(server, tiny_model, tmp_path):
    from infera.cli import main

    report = tmp_path / "bench.json"
    assert main(["bench", "serve", "--url", server.url, "--num-requests", "6", "--input-len-range", "16", "48",
                 "--output-len", "4", "--model-path", str(tiny_model("llama")), "--save-json", str(report)]) == 0
    [rep] = json.loads(report.read_text())["reports"]
    assert rep["completed"] == 6 and rep["failed"] == 0 and rep["output_tokens"] == 24
    assert rep["ttft_ms"]["p50"] > 0 and rep["output_throughput"] > 0


def test_engine_failure_fails_its_requests_not_the_server(server, monkeypatch):
    runner = server.engine.runner
    execute, faults = runner.execute, [RuntimeError("injected fault")] * 2

    def flaky(*args, **kwargs):
        if faults:
            raise faults.pop()
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", flaky)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected fault" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert "injected fault" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
    wait_until(server.idle, 30, "the failed requests were aborted")
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3


def test_run_on_fresh_thread_returns_or_raises_on_the_caller():
    """The server loads its model this way, so that only the engine thread keeps an OpenMP team."""
    caller = threading.get_ident()
    assert run_on_fresh_thread(threading.get_ident) != caller
    assert run_on_fresh_thread(int, "ff", base=16) == 255
    with pytest.raises(ValueError, match="invalid literal"):
        run_on_fresh_thread(int, "not a number")
