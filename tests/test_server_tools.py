"""Tool calling and reasoning output through the official ``openai`` client against a real server,
on the tiny random-weight Llama given a Qwen2.5-style chat template that renders tools.

A random model does not choose to call tools, so ``required`` and named choices (forced by the
grammar) carry the end-to-end checks of calls: the arguments validate against the function's
schema, and streamed and non-streamed requests give the same calls.  Under ``auto`` the server
must parse whatever the model writes.  The parsers' handling of real calls and reasoning is
tested on fixed strings in test_tool_parsers.py."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from infera.engine.llm_engine import LLMEngine
from infera.server.options import ServerOptions
from test_security import serve
from test_server import MODEL, Server, server  # noqa: F401  (fixture: the plain template, which shows no tools)

# Qwen2.5's template (tools in the system message, calls as <tool_call> blocks, tool results as
# <tool_response>), plus a ``think`` variable that opens the thinking as Qwen3's thinking models do
QWEN_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if think is defined and think %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"""

# schemas whose values a random model finishes quickly (enums, booleans, bounded integers)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                          "loud": {"type": "boolean"}},
         "required": ["hour", "loud"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": ALARM}}]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
ASK = [{"role": "user", "content": "What is the weather in Paris? And wake me at 7."}]


@pytest.fixture(scope="module")
def qwen_model(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "llama-qwen-template"
    shutil.copytree(tiny_model("llama"), path)
    (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def tools_server(qwen_model) -> Iterator[Server]:
    engine = LLMEngine(model=str(qwen_model), dtype="float32", kv_cache_memory="64MiB")
    with serve(engine, ServerOptions(max_tokens_limit=256)) as (srv, _):
        yield srv


@pytest.fixture(scope="module")
def thinking_server(qwen_model) -> Iterator[Server]:
    engine = LLMEngine(model=str(qwen_model), dtype="float32", kv_cache_memory="64MiB")
    with serve(engine, ServerOptions(max_tokens_limit=256, reasoning_parser="qwen3")) as (srv, _):
        yield srv


def calls_of(client: openai.OpenAI, stream: bool, **kw) -> tuple[list[tuple[str, dict]], str | None, str | None]:
    """(the calls as (name, arguments), finish_reason, content) of one choice, streamed or not; a
    streamed call's id and name come in its first delta, its arguments in the ones after."""
    if not stream:
        out = client.chat.completions.create(model=MODEL, **kw)
        choice = out.choices[0]
        assert all(c.id and c.type == "function" for c in choice.message.tool_calls or [])
        return ([(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []],
                choice.finish_reason, choice.message.content)
    calls: list[dict] = []
    content, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            if c.index == len(calls):
                assert c.id and c.type == "function" and c.function.name and not c.function.arguments
                calls.append({"name": c.function.name, "arguments": ""})
            else:
                assert c.id is None and c.function.name is None
                calls[c.index]["arguments"] += c.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return [(c["name"], json.loads(c["arguments"])) for c in calls], finish, content or None


@pytest.mark.parametrize("choice", ["required", "named", "required-single"])
def test_forced_tool_calls_validate_and_stream_alike(tools_server, choice):
    tool_choice = {"type": "function", "function": {"name": "set_alarm"}} if choice == "named" else "required"
    kw = dict(messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=120, temperature=0,
              parallel_tool_calls=choice != "required-single")
    client = tools_server.client()
    calls, finish, content = calls_of(client, False, **kw)
    assert finish == "tool_calls" and content is None and calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])
    if choice != "required":
        assert len(calls) == 1
    if choice == "named":
        assert calls[0][0] == "set_alarm"
    assert calls_of(client, True, **kw) == (calls, finish, content)


def test_forced_calls_sampled_always_validate(tools_server):
    """Sampled (one call each, so that a random model cannot run into max_tokens calling on and on)."""
    client = tools_server.client()
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=seed,
                                             n=2)
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
            for c in choice.message.tool_calls:
                jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_unforced_choices_parse_what_the_model_writes(tools_server, tool_choice):
    kw = dict(messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=24, temperature=0)
    client = tools_server.client()
    calls, finish, content = calls_of(client, False, **kw)
    assert finish in ("stop", "length", "tool_calls")
    assert content or calls
    if tool_choice == "none":
        assert not calls and content
    assert calls_of(client, True, **kw) == (calls, finish, content)


def test_tool_calls_and_results_render_through_the_template(tools_server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    ids = httpx.post(f"{tools_server.url}/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(f"{tools_server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert json.dumps(TOOLS[0]["function"]["parameters"]) in text  # the tools, as the template lists them
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    out = tools_server.client().chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_request_errors(tools_server, server):
    client = tools_server.client()
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    bad = [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=bad)
    # the bundled template shows no tool format: auto needs --tool-call-parser, a forced call writes hermes's
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    out = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls"
    for c in out.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def reasoning_of(client: openai.OpenAI, stream: bool, **kw) -> tuple[str | None, str | None, str | None]:
    """(reasoning_content, content, finish_reason), streamed or not (``reasoning`` must match ``reasoning_content``)."""
    if not stream:
        out = client.chat.completions.create(model=MODEL, **kw)
        m = out.choices[0].message
        assert getattr(m, "reasoning", None) == getattr(m, "reasoning_content", None)
        return getattr(m, "reasoning_content", None), m.content, out.choices[0].finish_reason
    reasoning, also, content, finish = "", "", "", None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        also += getattr(delta, "reasoning", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert also == reasoning
    return reasoning or None, content or None, finish


def test_reasoning_split_streamed_and_not(thinking_server):
    client = thinking_server.client()
    # the prompt opens the thinking: the random model never closes it, so all of it is reasoning
    kw = dict(messages=ASK, max_tokens=16, temperature=0, extra_body={"chat_template_kwargs": {"think": True}})
    whole = reasoning_of(client, False, **kw)
    assert whole[0] and whole[1] is None and whole[2] == "length"
    assert reasoning_of(client, True, **kw) == whole
    # a prompt that does not open it, and output that does not start with <think>: all content
    kw["extra_body"] = {"chat_template_kwargs": {"think": False}}
    whole = reasoning_of(client, False, **kw)
    assert whole[0] is None and whole[1]
    assert reasoning_of(client, True, **kw) == whole


def test_thinking_budget_and_no_thinking(thinking_server):
    client = thinking_server.client()
    opened = {"chat_template_kwargs": {"think": True}}
    kw = dict(messages=ASK, temperature=0)
    first, _, _ = reasoning_of(client, False, max_tokens=5, extra_body=opened, **kw)
    # budget forcing: </think> after 5 thinking tokens, then the answer (the random model never closes it itself)
    reasoning, content, finish = reasoning_of(client, False, max_tokens=30,
                                              extra_body={**opened, "max_thinking_tokens": 5}, **kw)
    assert reasoning == first and content and finish == "length"
    assert reasoning_of(client, True, max_tokens=30, extra_body={**opened, "max_thinking_tokens": 5},
                        **kw) == (reasoning, content, finish)
    # NoThinking: the opened thinking is closed in the prompt, so all of the output is the answer
    reasoning, content, _ = reasoning_of(client, False, max_tokens=12, extra_body={**opened, "thinking": False}, **kw)
    assert reasoning is None and content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"max_thinking_tokens": 0})
    # under an output constraint the forced end of thinking passes the grammar and the JSON follows
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reasoning, content, finish = reasoning_of(
        client, False, max_tokens=60, extra_body={**opened, "max_thinking_tokens": 5}, **kw,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert reasoning == first and finish == "stop"
    jsonschema.validate(json.loads(content), schema)


def test_constraint_applies_after_the_thinking(thinking_server):
    """With the thinking opened, the grammar lets it run and constrains only what follows
    </think>: the random model never writes </think>, so the whole output is free reasoning
    (without the reasoning parser it would be forced JSON)."""
    client = thinking_server.client()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    kw = dict(messages=ASK, max_tokens=16, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
              extra_body={"chat_template_kwargs": {"think": True}})
    reasoning, content, finish = reasoning_of(client, False, **kw)
    assert reasoning and not reasoning.startswith("{") and content is None and finish == "length"
    # forced tool calls after the thinking: same
    kw = dict(messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=16, temperature=0,
              extra_body={"chat_template_kwargs": {"think": True}})
    reasoning, content, finish = reasoning_of(client, False, **kw)
    assert reasoning and content is None and finish == "length"
    # without opened thinking the output either thinks first or is the constrained JSON right away
    kw = dict(messages=ASK, max_tokens=60, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    reasoning, content, finish = reasoning_of(client, False, **kw)
    if reasoning is None or finish == "stop":
        jsonschema.validate(json.loads(content), schema)
    assert reasoning_of(client, True, **kw) == (reasoning, content, finish)
