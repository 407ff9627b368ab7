"""``/v1/responses`` through the official ``openai`` client against a real server: a request runs as
the chat completion it translates to (so the output equals chat's under greedy decoding), streamed
as the Responses API's events; function tools in the Responses' flat form, forced by the grammar
(arguments validate against their schemas); the stateless server refuses ``previous_response_id``."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from infera.server.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall, UsageInfo
from infera.server.protocol_responses import ResponsesResponse
from infera.server.serving_responses import ResponseOutput
from test_server import CHAT, MODEL, server  # noqa: F401  (fixture)
from test_server_tools import ASK, SCHEMAS, TOOLS, qwen_model, tools_server  # noqa: F401  (fixtures)

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's form
INSTRUCTIONS = "Answer in one short sentence."


def streamed(client: openai.OpenAI, **kw) -> tuple[list, ResponsesResponse]:
    """(every event, the response of the final one); checks the numbering and the framing events."""
    events = list(client.responses.create(model=MODEL, stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.id == events[0].response.id
    return events, events[-1].response


def test_text_response_streamed_and_not(server):
    client = server.client()
    kw = dict(input=CHAT[0]["content"], instructions=INSTRUCTIONS, max_output_tokens=12, temperature=0)
    out = client.responses.create(model=MODEL, store=True, **kw)
    assert out.object == "response" and out.id.startswith("resp_") and out.model == MODEL
    assert out.store is False and out.instructions == INSTRUCTIONS and out.max_output_tokens == 12
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [c.type for c in message.content] == ["output_text"] and out.output_text
    # the instructions are the system message; the output is the chat completion's
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": INSTRUCTIONS}, *CHAT],
                                          max_tokens=12, temperature=0)
    assert out.output_text == chat.choices[0].message.content
    assert (out.usage.input_tokens, out.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                 chat.usage.completion_tokens)
    assert out.usage.total_tokens == chat.usage.total_tokens
    incomplete = chat.choices[0].finish_reason == "length"
    assert out.status == ("incomplete" if incomplete else "completed") and message.status == out.status
    assert (out.incomplete_details is not None) == incomplete

    events, final = streamed(client, **kw)
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{out.status}"]
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    assert "".join(e.delta for e in deltas) == events[-4].text == out.output_text
    assert events[-2].item.content[0].text == out.output_text
    assert final.output_text == out.output_text and final.usage.output_tokens == out.usage.output_tokens
    assert server.idle()


def test_input_items_render_as_chat_messages(tools_server):
    """Messages (string or input_text parts), an earlier call and its output, as the template renders the
    chat messages they translate to (the same prompt tokens)."""
    items = [{"role": "developer", "content": "Use the tools."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK[0]["content"]}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris", "unit": "celsius"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 C, sunny"},
             {"type": "reasoning", "id": "rs_1", "summary": []}]  # sent back by clients; not rendered
    messages = [{"role": "system", "content": "Use the tools."}, ASK[0],
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    ids = httpx.post(f"{tools_server.url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    out = tools_server.client().responses.create(model=MODEL, input=items, tools=FLAT_TOOLS, tool_choice="none",
                                                 max_output_tokens=4)
    assert out.usage.input_tokens == len(ids)
    assert out.tools[0].name == "get_weather" and out.tool_choice == "none"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "set_alarm"}])
def test_function_calls_validate_and_stream_alike(tools_server, tool_choice):
    client = tools_server.client()
    kw = dict(input=ASK[0]["content"], tools=FLAT_TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
              max_output_tokens=120, temperature=0)
    out = client.responses.create(model=MODEL, **kw)
    assert out.status == "completed"
    [call] = [item for item in out.output if item.type == "function_call"]
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    if isinstance(tool_choice, dict):
        assert call.name == "set_alarm"

    events, final = streamed(client, **kw)
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert len(added) == 1 and added[0].item.name == call.name and added[0].item.arguments == ""
    index, item_id = added[0].output_index, added[0].item.id
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas and all(e.item_id == item_id and e.output_index == index for e in deltas)
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(e.delta for e in deltas) == done.arguments == call.arguments
    [streamed_call] = [item for item in final.output if item.type == "function_call"]
    assert (streamed_call.name, streamed_call.arguments) == (call.name, call.arguments)
    assert tools_server.idle()


def test_text_format_json_schema(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    out = server.client().responses.create(
        model=MODEL, input="Is the cache warm?", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(out.output_text), schema)
    assert out.text.format.type == "json_schema" and out.text.format.schema_ == schema  # echoed


def test_response_request_errors(server, tools_server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/v1/responses" in paths and "/v1/embeddings" in paths
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="stateless") as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model=MODEL, input="hi", background=True)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        tools_server.client().responses.create(model=MODEL, input="hi", tools=FLAT_TOOLS,
                                               tool_choice={"type": "function", "name": "nope"})
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=10**6)
    assert e.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="hi")
    response = httpx.post(f"{server.url}/v1/responses", json={"input": [{"type": "item_reference", "id": "msg_1"}]})
    assert response.status_code == 400 and "an input item is a message" in response.json()["error"]["message"]
    for body in ({}, {"input": []}, {"input": 5}, {"input": [{"type": "item_reference", "id": "msg_1"}]},
                 {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
                 {"input": [{"role": "tool", "content": "x"}]},
                 {"input": "hi", "tools": [{"type": "web_search"}]},
                 {"input": "hi", "tool_choice": "required"},
                 {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}):
        response = httpx.post(f"{server.url}/v1/responses", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"], body
    assert server.idle()


def test_output_items_and_events_of_reasoning_text_and_calls():
    """Reasoning, then text, then two calls whose arguments grow out of order: the items close as
    the next kind opens (calls at the end), each event names its item's place."""
    response = ResponsesResponse(model=MODEL)
    output = ResponseOutput(response)
    call = lambda i, **kw: DeltaToolCall(index=i, function=DeltaFunctionCall(**kw))  # noqa: E731
    deltas = [DeltaMessage(reasoning_content="Think"), DeltaMessage(reasoning_content="ing."),
              DeltaMessage(content="Calling."),
              DeltaMessage(tool_calls=[DeltaToolCall(index=0, id="call_a", type="function",
                                                     function=DeltaFunctionCall(name="f", arguments=""))]),
              DeltaMessage(tool_calls=[call(0, arguments='{"x": ')]),
              DeltaMessage(tool_calls=[DeltaToolCall(index=1, id="call_b", type="function",
                                                     function=DeltaFunctionCall(name="g", arguments=""))]),
              DeltaMessage(tool_calls=[call(0, arguments="1}"), call(1, arguments="{}")])]
    events = [json.loads(e.split("data: ", 1)[1]) for d in deltas for e in output.add(d)]
    events += [json.loads(e.split("data: ", 1)[1])
               for e in output.finish("stop", UsageInfo(prompt_tokens=3, completion_tokens=5, total_tokens=8))]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0), ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1), ("response.output_text.delta", 1),
        ("response.output_text.done", 1), ("response.content_part.done", 1), ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.output_item.added", 3), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.delta", 3),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.function_call_arguments.done", 3), ("response.output_item.done", 3)]
    assert response.status == "completed" and response.usage.total_tokens == 8
    assert [item.model_dump(include={"type", "status"}) for item in response.output] == \
        [{"type": t, "status": "completed"} for t in ("reasoning", "message", "function_call", "function_call")]
    reasoning, message, f, g = response.output
    assert reasoning.content[0].text == "Thinking." and message.content[0].text == "Calling."
    assert (f.call_id, f.name, f.arguments, g.call_id, g.arguments) == ("call_a", "f", '{"x": 1}', "call_b", "{}")
