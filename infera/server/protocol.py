"""The OpenAI API's request and response bodies as pydantic models (plus vLLM's extras).

Requests are validated here; anything that does not fit becomes a 400 with the field named.
Field names, defaults and response shapes follow OpenAI's API reference, so that the official
clients and the tools built on them work unchanged.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, PrivateAttr, StringConstraints,
                      field_validator, model_serializer, model_validator)

from infera.sampling_params import KV_POLICIES, MAX_LOGPROBS, SamplingParams, StructuredOutputParams
from infera.structured.bounds import check_schema_value

MAX_N = 128
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds (each sample adds its index)
# Bounds on lists and strings a request may send (the body as a whole: ServerOptions.max_request_body_bytes)
MAX_PROMPTS = 256  # prompts in one completion request
MAX_CHOICES = 1024  # n x prompts
MAX_STOP = 64  # stop strings
MAX_STOP_CHARS = 1024  # characters in one stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_MESSAGES = 4096
MAX_USER_CHARS = 256
MAX_TOOLS = 128  # as OpenAI
MAX_LOGIT_BIAS = 1024  # tokens a request may bias
TOKEN_ID = re.compile(r"[0-9]{1,10}\Z")
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's letters, digits, _ and - (and dots), at most 64

StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    """Fields the model does not know are ignored, and remembered: :func:`ignored_fields` lists them
    (the server logs them, as vLLM does)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    _ignored: list[str] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _note_ignored(cls, data: Any, handler: ModelWrapValidatorHandler[OpenAIModel]) -> OpenAIModel:
        model = handler(data)
        if isinstance(data, dict) and isinstance(model, OpenAIModel):
            known = _field_names(type(model))
            ignored = [str(key) for key in data if key not in known]
            if ignored:
                model._ignored = ignored
        return model


@cache
def _field_names(cls: type[BaseModel]) -> frozenset[str]:
    """The keys a model reads: its fields' names and aliases."""
    return frozenset(n for name, f in cls.model_fields.items() for n in (name, f.alias) if n)


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """The fields of a validated request that ``model`` and the models in it ignored, as paths
    (``stream_options.foo``, ``messages[].bar``), each once."""
    names = [prefix + name for name in getattr(model, "_ignored", None) or ()]
    for name, f in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{f.alias or name}"
        if isinstance(value, OpenAIModel):
            names += ignored_fields(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], OpenAIModel):
            for item in value:
                names += ignored_fields(item, path + "[].")
    return list(dict.fromkeys(names))


# -- errors -------------------------------------------------------------------------------
class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# -- request pieces -----------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, the usage so far in every chunk


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's ``structured_outputs`` field: one output constraint (see StructuredOutputParams)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None

    @property
    def given(self) -> dict[str, Any]:
        """The constraints given, by StructuredOutputParams' names."""
        values = {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": self.json_object or None, "structural_tag": self.structural_tag}
        return {k: v for k, v in values.items() if v is not None}


GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_grammar": "grammar",
                  "guided_choice": "choice"}  # the older names of structured_outputs' keys (vLLM's)


class SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias, clamped to [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    response_format: ResponseFormat | None = None
    # vLLM's extras, accepted at top level
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    max_thinking_tokens: int | None = Field(None, ge=1)  # budget forcing of a reasoning model's <think>
    kv_policy: Literal[KV_POLICIES] | None = None  # this request's KV policy (--kv-policy)
    kv_budget: float | None = Field(None, gt=0.0)
    kv_sink_tokens: int | None = Field(None, ge=0)
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids in the response
    structured_outputs: StructuredOutputsRequest | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: each prompt token's, and the top k
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None

    @model_validator(mode="after")
    def _check_common(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None:
            if len(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"biases {len(bias)} tokens; at most {MAX_LOGIT_BIAS}")
            bad = next((key for key in bias if not TOKEN_ID.match(key)), None)
            if bad is not None:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {bad[:32]!r}")
        return bias

    @model_validator(mode="after")
    def _check_prompt_logprobs(self) -> SamplingRequest:
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true (as in vLLM)")
        return self

    @property
    def num_prompt_logprobs(self) -> int | None:
        """How many top alternatives the engine returns for each prompt token (None: no prompt log-probabilities)."""
        return self.prompt_logprobs

    @property
    def constraint_field(self) -> str | None:
        """The field that carries the output constraint (named in errors about it)."""
        names = ("response_format", "structured_outputs", *GUIDED_ALIASES)
        return next((name for name in names if getattr(self, name) is not None), None)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage in every streamed chunk (vLLM's ``continuous_usage_stats``, which needs ``include_usage``)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def structured(self) -> StructuredOutputParams | None:
        """``response_format``, ``structured_outputs`` or a ``guided_*`` alias as one output constraint
        (or none); ValueError when more than one field gives one."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            given.append(("response_format", {"json": fmt.json_schema.schema_}))
        elif fmt is not None and fmt.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs.given))
        given += [(name, {key: getattr(self, name)}) for name, key in GUIDED_ALIASES.items()
                  if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0][0]} and {given[1][0]} both constrain the output; give one of them")
        return StructuredOutputParams(**given[0][1]) if given else None

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """``defaults``: the model's values (``--generation-config``) for the fields the request omits."""
        defaults = defaults or {}

        def value(name: str, fallback: Any) -> Any:
            return _or(getattr(self, name), defaults.get(name, fallback))

        return SamplingParams(
            n=self.n, temperature=value("temperature", 1.0), top_p=value("top_p", 1.0), top_k=value("top_k", 0),
            min_p=value("min_p", 0.0), repetition_penalty=value("repetition_penalty", 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=self.seed, max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens), stop=self.stop,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
            max_thinking_tokens=self.max_thinking_tokens, kv_policy=self.kv_policy,
            kv_budget=self.kv_budget, kv_sink_tokens=self.kv_sink_tokens, structured=self.structured())


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- completions --------------------------------------------------------------------------
def prompt_list(name: str, value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt field (text, token ids, or a list of either) as a list of prompts; ValueError naming
    ``name`` if it is empty or holds more than MAX_PROMPTS."""
    if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
        raise ValueError(f"{name} must not be empty")
    prompts = [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{name} holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    return prompts


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt is scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the text (and with logprobs, the log-probabilities) start with the prompt's
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        num_prompts = len(prompt_list("prompt", self.prompt))
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (set n instead)")
        if num_prompts * self.n > MAX_CHOICES:
            raise ValueError(f"{num_prompts} prompts x n={self.n} is {num_prompts * self.n} choices; at most "
                             f"{MAX_CHOICES} per request")
        return self

    @property
    def num_prompt_logprobs(self) -> int | None:
        """``prompt_logprobs``, and with echo and logprobs, at least ``logprobs`` (the echoed tokens' alternatives)."""
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(ks) if ks else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        return prompt_list("prompt", self.prompt)


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class Logprob(OpenAIModel):
    """vLLM's entry of ``prompt_logprobs``: a token's log-probability, its rank, its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt token (the first: None), token id -> entry


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    token_ids: list[int] | None = None


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# -- chat completions ---------------------------------------------------------------------
class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            check_schema_value(parameters)
        return parameters

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """The arguments' schema (no parameters: an object without properties, as OpenAI reads it)."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ChatCompletionToolsParam(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(OpenAIModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIModel):
    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
        return content

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: plain text content, developer -> system, and
        tool calls' arguments as objects (templates write them with ``tojson``), as vLLM passes them."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ScalingRequest(BaseModel):
    """infera's extra: answer by an inference-time scaling method (see infera.scaling).  Keys
    other than these three are the method's options (temperature, max_tokens, beam_width, ...)."""

    model_config = ConfigDict(extra="allow")
    method: str
    budget: int = Field(8, ge=1, le=1024)
    reward: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatCompletionToolsParam] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's: a template of the request's own (--trust-request-chat-template)
    thinking: bool = True  # false: a reasoning model answers without thinking (NoThinking)
    scaling: ScalingRequest | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, ChatCompletionNamedToolChoiceParam) and choice.function.name not in self.tool_names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
        if self.forced_tools is not None and super().constraint_field is not None:
            raise ValueError(f"tool_choice {self.tool_choice_mode!r} constrains the output; it cannot be combined "
                             f"with {super().constraint_field}")
        if self.scaling is not None and (self.stream or self.n != 1 or self.logprobs or self.constraint_field
                                         or self.tools or self.logit_bias):
            raise ValueError("scaling takes a single non-streamed choice without logprobs, output constraints, "
                             "logit_bias or tools")
        return self

    @model_validator(mode="after")
    def _check_scaling_prompt_logprobs(self) -> ChatCompletionRequest:
        if self.scaling is not None and self.prompt_logprobs is not None:
            raise ValueError("scaling answers without prompt_logprobs")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    @property
    def tool_choice_mode(self) -> Literal["none", "auto", "required", "named"]:
        """``auto`` when tools come without a choice (OpenAI's default), ``none`` without tools."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tools(self) -> list[FunctionDefinition] | None:
        """The functions the output must call (``required``: any of them, named: that one); None when not forced."""
        mode = self.tool_choice_mode
        if mode == "required":
            return [t.function for t in self.tools]
        if mode == "named":
            return [t.function for t in self.tools if t.function.name == self.tool_choice.function.name]
        return None

    @property
    def constraint_field(self) -> str | None:
        return super().constraint_field or ("tool_choice" if self.forced_tools is not None else None)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser: the thinking (vLLM's name)
    reasoning: str | None = None  # the same (vLLM's newer name)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs (vLLM's place for it)
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class ScalingChatCompletionResponse(ChatCompletionResponse):
    """A chat completion answered by a scaling method: the chosen solution is the message;
    ``scaling`` summarizes the search (answer, candidates' scores, tokens spent)."""

    scaling: dict[str, Any]


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}


class DeltaToolCall(OpenAIModel):
    """A streamed tool call: its id, type and name first, then pieces of its arguments under the same index."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        return {"index": self.index, **{k: v for k, v in (("id", self.id), ("type", self.type)) if v is not None},
                "function": self.function.model_dump()}


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _drop_unset(self) -> dict[str, Any]:
        fields = (("role", self.role), ("content", self.content), ("reasoning_content", self.reasoning_content),
                  ("reasoning", self.reasoning),
                  ("tool_calls", [c.model_dump() for c in self.tool_calls] if self.tool_calls else None))
        return {k: v for k, v in fields if v is not None}


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the chunk's tokens


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# -- models, tokenizer --------------------------------------------------------------------
class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "infera"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    tools: list[ChatCompletionToolsParam] | None = Field(None, max_length=MAX_TOOLS)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class OpenAIError(Exception):
    """An error answered as OpenAI does: ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
