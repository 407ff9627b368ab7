"""OpenAI's Responses API (``/v1/responses``), stateless: a request becomes a chat completion
request (:meth:`ResponsesRequest.chat_request`) that runs through the chat path (template, tools,
reasoning parser, output constraints), and its message comes back as output items: ``reasoning``,
``message`` with ``output_text``, ``function_call``; streamed as the Responses API's events.

Nothing is stored: ``store`` is accepted and answered ``false`` (as vLLM does without its store),
``previous_response_id`` and ``background`` need stored responses and are refused with a 400."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from infera.server.protocol import (ChatCompletionChunk, ChatCompletionResponse, DeltaFunctionCall, DeltaMessage,
                                    DeltaToolCall, OpenAIError, UsageInfo)
from infera.server.protocol_responses import (FunctionCallItem, IncompleteDetails, OutputMessage, OutputText,
                                              ReasoningItem, ReasoningText, ResponseError, ResponsesRequest,
                                              ResponsesResponse, ResponseUsage)
from infera.server.serving import OpenAIServing

# the chat request's fields, as a Responses request names them (in errors)
RESPONSES_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


class OpenAIServingResponses:
    """Responses through the chat completions of ``serving``."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create_responses(self, req: ResponsesRequest) -> ResponsesResponse | AsyncIterator[str]:
        for name in ("previous_response_id", "background"):
            if getattr(req, name):
                raise OpenAIError(400, f"{name} is not supported: this server is stateless and stores no responses; "
                                       f"send the whole conversation in input", param=name)
        try:
            chat = req.chat_request()
        except ValidationError as e:
            raise OpenAIError(400, "; ".join(str(err["msg"]).removeprefix("Value error, ")
                                             for err in e.errors())) from None
        try:
            result = await self.serving.create_chat_completion(chat)
        except OpenAIError as e:
            param = e.body.error.param
            e.body.error.param = RESPONSES_PARAMS.get(param, param)
            raise
        response = ResponsesResponse(
            model=self.serving.model_name, instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls, temperature=req.temperature, top_p=req.top_p, text=req.text,
            tool_choice=req.tool_choice, tools=req.tools, metadata=req.metadata, user=req.user)
        if isinstance(result, ChatCompletionResponse):
            choice = result.choices[0]
            message = choice.message
            output = ResponseOutput(response)
            output.add(DeltaMessage(reasoning_content=message.reasoning_content, content=message.content, tool_calls=[
                DeltaToolCall(index=i, id=c.id, type="function", function=DeltaFunctionCall(
                    name=c.function.name, arguments=c.function.arguments)) for i, c in enumerate(message.tool_calls)]))
            output.finish(choice.finish_reason, result.usage)
            return response
        return self._events(response, result)

    @staticmethod
    async def _events(response: ResponsesResponse, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The Responses events of a chat completion stream (its server-sent events, read back)."""
        output = ResponseOutput(response)
        yield output.event("response.created", response=response.model_dump())
        yield output.event("response.in_progress", response=response.model_dump())
        finish_reason, usage = None, None
        try:
            async for frame in chunks:
                payload = frame.removeprefix("data: ").strip()
                if payload == "[DONE]":
                    continue
                data = json.loads(payload)
                if "error" in data:  # the chat stream's in-band error: the generation failed
                    error = data["error"]
                    response.status = "failed"
                    response.error = ResponseError(code=str(error.get("code") or error["type"]),
                                                   message=error["message"])
                    yield output.event("response.failed", response=response.model_dump())
                    return
                chunk = ChatCompletionChunk.model_validate(data)
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    for event in output.add(choice.delta):
                        yield event
                    finish_reason = choice.finish_reason or finish_reason
        finally:
            await chunks.aclose()
        for event in output.finish(finish_reason, usage):
            yield event
        yield output.event(f"response.{response.status}", response=response.model_dump())


class ResponseOutput:
    """A response's output items as the chat message grows (:meth:`add` its deltas, then
    :meth:`finish`), and the stream events that tell it, each numbered (``sequence_number``).
    Reasoning and text items close when another item opens; function calls when the output ends."""

    def __init__(self, response: ResponsesResponse):
        self.response = response
        self.text_item: OutputMessage | ReasoningItem | None = None  # open
        self.calls: dict[int, FunctionCallItem] = {}  # by the chat tool call's index
        self.sequence_number = 0

    def event(self, type: str, **fields: Any) -> str:
        """One server-sent event."""
        payload = json.dumps({"type": type, "sequence_number": self.sequence_number, **fields})
        self.sequence_number += 1
        return f"event: {type}\ndata: {payload}\n\n"

    def add(self, delta: DeltaMessage) -> list[str]:
        events = []
        if delta.reasoning_content:
            events += self._text(ReasoningItem, delta.reasoning_content)
        if delta.content:
            events += self._text(OutputMessage, delta.content)
        for call in delta.tool_calls or []:
            if call.id is not None:
                events += self._close_text("completed")
                item = self.calls[call.index] = FunctionCallItem(call_id=call.id, name=call.function.name)
                events.append(self._added(item))
            item = self.calls[call.index]
            if call.function.arguments:
                item.arguments += call.function.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                         output_index=self._index(item), delta=call.function.arguments))
        return events

    def finish(self, finish_reason: str | None, usage: UsageInfo | None) -> list[str]:
        """Close every open item and settle the response's status and usage."""
        response = self.response
        incomplete = finish_reason == "length"
        response.status = "incomplete" if incomplete else "completed"
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens") if incomplete else None
        if usage is not None:
            response.usage = ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                           total_tokens=usage.total_tokens)
        events = self._close_text(response.status)
        for item in self.calls.values():
            item.status = response.status
            index = self._index(item)
            events.append(self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                     name=item.name, arguments=item.arguments))
            events.append(self.event("response.output_item.done", output_index=index, item=item.model_dump()))
        return events

    def _index(self, item: Any) -> int:
        return next(i for i, x in enumerate(self.response.output) if x is item)

    def _added(self, item: Any) -> str:
        self.response.output.append(item)
        return self.event("response.output_item.added", output_index=self._index(item), item=item.model_dump())

    def _text(self, kind: type[OutputMessage] | type[ReasoningItem], text: str) -> list[str]:
        """``text`` appended to the open item of ``kind`` (opened here, closing another)."""
        item, events = self.text_item, []
        if not isinstance(item, kind):
            events += self._close_text("completed")
            item = self.text_item = kind()
            events.append(self._added(item))
            item.content.append(OutputText(text="") if kind is OutputMessage else ReasoningText(text=""))
            events.append(self.event("response.content_part.added", item_id=item.id, output_index=self._index(item),
                                     content_index=0, part=item.content[0].model_dump()))
        item.content[0].text += text
        name = "output_text" if kind is OutputMessage else "reasoning_text"
        extra = {"logprobs": []} if kind is OutputMessage else {}
        events.append(self.event(f"response.{name}.delta", item_id=item.id, output_index=self._index(item),
                                 content_index=0, delta=text, **extra))
        return events

    def _close_text(self, status: str) -> list[str]:
        item = self.text_item
        if item is None:
            return []
        self.text_item = None
        item.status = status
        index, part = self._index(item), item.content[0]
        name = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
        extra = {"logprobs": []} if isinstance(item, OutputMessage) else {}
        return [self.event(f"response.{name}.done", item_id=item.id, output_index=index, content_index=0,
                           text=part.text, **extra),
                self.event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                           part=part.model_dump()),
                self.event("response.output_item.done", output_index=index, item=item.model_dump())]
