"""The OpenAI Responses API's request and response bodies (stateless: nothing is stored, so a
request carries its whole conversation in ``input``).  A request becomes a chat completion request
(:meth:`ResponsesRequest.chat_request`); the shared pieces and bounds are in
:mod:`infera.server.protocol`."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from infera.server.protocol import (MAX_MESSAGES, MAX_TOOLS, MAX_USER_CHARS, ChatCompletionNamedFunction,
                                    ChatCompletionNamedToolChoiceParam, ChatCompletionRequest, ChatCompletionToolsParam,
                                    ChatMessage, FunctionCall, FunctionDefinition, JsonSchemaFormat, OpenAIModel,
                                    ResponseFormat, StreamOptions, ToolCall)


def response_id(prefix: str) -> str:
    """An id as OpenAI writes them: ``resp_…``, ``msg_…``, ``fc_…``, ``rs_…``."""
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ------------------------------------------------------------------------------
class InputTextPart(OpenAIModel):
    """A message's text: ``input_text``, or ``output_text`` in an earlier assistant turn."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart]


class FunctionCallInput(OpenAIModel):
    """A call the model made in an earlier turn."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputInput(OpenAIModel):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]


class ReasoningInput(OpenAIModel):
    """An earlier turn's reasoning, sent back by clients; not rendered (chat templates drop earlier thinking)."""

    type: Literal["reasoning"]


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallInput, Tag("function_call")]
                      | Annotated[FunctionCallOutputInput, Tag("function_call_output")]
                      | Annotated[ReasoningInput, Tag("reasoning")],
                      Discriminator(lambda item: item.get("type", "message") if isinstance(item, dict)
                                    else getattr(item, "type", None), custom_error_type="invalid_input_item",
                                    custom_error_message="an input item is a message, function_call, "
                                                         "function_call_output or reasoning item")]


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat form: ``{type, name, description, parameters, strict}``."""

    type: Literal["function"]


class ToolChoiceFunction(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    """``text.format``: plain text, any JSON object, or JSON of a schema (Responses' flat json_schema)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a text.format of type json_schema needs a schema")
        return self


class TextConfig(OpenAIModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[FunctionTool] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig = Field(default_factory=TextConfig)
    stream: bool = False
    store: bool = True  # accepted, as vLLM without a store: nothing is stored and the response says store false
    previous_response_id: str | None = None  # needs stored responses: refused
    background: bool = False  # likewise
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)

    def messages(self) -> list[ChatMessage]:
        """``instructions`` and ``input`` as chat messages: instructions as the system message, a
        call as an assistant message's tool call (joined to the assistant turn before it), its
        output as a ``tool`` message."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                messages.append(ChatMessage(role=item.role, content=_text(item.content)))
            elif isinstance(item, FunctionCallInput):
                call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    last.tool_calls = [*(last.tool_calls or []), call]
                else:
                    messages.append(ChatMessage(role="assistant", tool_calls=[call]))
            elif isinstance(item, FunctionCallOutputInput):
                messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output)))
        return messages

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (ValueError where it does not make one)."""
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceFunction):
            choice = ChatCompletionNamedToolChoiceParam(function=ChatCompletionNamedFunction(name=choice.name))
        fmt = self.text.format
        response_format = None
        if fmt.type != "text":
            schema = (JsonSchemaFormat(name=fmt.name, description=fmt.description, schema=fmt.schema_,
                                       strict=fmt.strict) if fmt.type == "json_schema" else None)
            response_format = ResponseFormat(type=fmt.type, json_schema=schema)
        tools = [ChatCompletionToolsParam(function=FunctionDefinition(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)) for t in self.tools]
        return ChatCompletionRequest(
            model=self.model, messages=self.messages(), max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, tools=tools or None,
            tool_choice=choice if tools or choice not in ("auto", "none") else None, parallel_tool_calls=self.parallel_tool_calls,
            response_format=response_format, stream=self.stream,
            stream_options=StreamOptions(include_usage=True) if self.stream else None, user=self.user)


def _text(content: str | list[InputTextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


# -- response -----------------------------------------------------------------------------
class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: response_id("msg"))
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(OpenAIModel):
    """The thinking (with --reasoning-parser), as ``reasoning_text`` content; no summary is written."""

    type: Literal["reasoning"] = "reasoning"
    id: str = Field(default_factory=lambda: response_id("rs"))
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: response_id("fc"))
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


OutputItem = OutputMessage | ReasoningItem | FunctionCallItem


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens"]


class ResponseError(OpenAIModel):
    code: str
    message: str


class ResponsesResponse(OpenAIModel):
    """A Response object; the request's settings are echoed as OpenAI does."""

    id: str = Field(default_factory=lambda: response_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    store: bool = False
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
