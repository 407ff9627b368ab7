"""OpenAI completions and chat completions over the async engine: prompts in, responses or
server-sent-event streams out."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from infera.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from infera.engine.thinking_budget import END_TEXT as THINK_END_TEXT
from infera.engine.thinking_budget import opens_thinking
from infera.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from infera.sampling_params import SamplingParams, StructuredOutputParams
from infera.server.chat_output import ChatOutputParser
from infera.server.chat_template import ChatTemplateRenderer, check_template_kwargs, load_chat_template
from infera.server.metrics import ServerMetrics
from infera.scaling.api import build_search
from infera.scaling.controller import SearchJob, SearchOutcome
from infera.scaling.search import SearchConfig
from infera.scaling.rewards import Reward
from infera.server.options import ServerOptions
from infera.server.reasoning_parser import REASONING_PARSERS, ReasoningParser
from infera.server.tool_parsers import TOOL_PARSERS, ToolParser, detect_tool_parser
from infera.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatCompletionToolsParam, ChatLogprobs, ChatLogprobToken,
                                    ChatMessage, ChatStreamChoice, CompletionChoice, CompletionLogProbs,
                                    CompletionRequest, CompletionResponse, DeltaMessage, Logprob, OpenAIError,
                                    OpenAIModel, PromptLogprobs, SamplingRequest, ScalingChatCompletionResponse,
                                    TopLogprob, UsageInfo, ignored_fields, random_id)

NO_THINKING = "Okay, I think I have finished thinking.\n" + THINK_END_TEXT  # NoThinking's prefilled thought

logger = logging.getLogger("infera.server")

MIN_LOGPROB = -9999.0  # JSON has no -inf
MAX_SCALING_TOKENS = 2**20  # budget x max_tokens: the most tokens one scaling request may generate
MAX_IGNORED_LOGGED = 1024  # ignored request fields remembered (each is logged once)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


@dataclass
class ChoiceState:
    """How much of one choice was already sent."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    done: bool = False


@dataclass
class EchoedPrompt:
    """A prompt as an echoing completion returns it: its text and where each token's text starts in it."""

    text: str
    offsets: list[int]


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None


class OpenAIServing:
    """``reward_models``: the operator's reward models by name (a scaling request's ``model:NAME``)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics, options: ServerOptions,
                 reward_models: dict[str, Reward] | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.options = options
        self.reward_models = reward_models or {}
        longest_token = max(map(len, self.tokenizer.hf.get_vocab()))  # a prompt that fits has fewer characters
        self.renderer = ChatTemplateRenderer(self.tokenizer, options.chat_template_timeout,
                                             max_chars=engine.max_model_len * longest_token)
        self._token_text: dict[int, str] = {}
        self._ignored_logged: set[tuple[str, str]] = set()
        self.chat_template = load_chat_template(options.chat_template)  # None: the model's
        if self.chat_template is not None:
            logger.info("chat template from --chat-template (%d characters)", len(self.chat_template))
        # the model's sampling defaults (--generation-config) for what a request omits
        self.default_sampling_params = engine.default_sampling_params
        if self.default_sampling_params:
            logger.info("sampling defaults for fields a request omits (--generation-config %s): %s",
                        engine.config.generation_config,
                        ", ".join(f"{k}={v}" for k, v in self.default_sampling_params.items()))
        self.tool_call_parser = options.tool_call_parser or detect_tool_parser(self._model_template())
        if options.tool_call_parser is None and self.tool_call_parser is not None:
            logger.info("tool calls parsed as %s (the format of the model's chat template)", self.tool_call_parser)

    def _model_template(self) -> str | None:
        """The chat template requests are rendered with (--chat-template, else the model's)."""
        try:
            return self.chat_template or self.tokenizer.hf.get_chat_template()
        except ValueError:  # no template
            return None

    def note_ignored(self, endpoint: str, req: OpenAIModel) -> None:
        """Log the request fields the server does not know (ignored; the request goes on), each field
        name once per endpoint, as vLLM warns of them."""
        new = [name[:64] for name in ignored_fields(req) if (endpoint, name[:64]) not in self._ignored_logged]
        if not new or len(self._ignored_logged) >= MAX_IGNORED_LOGGED:
            return
        self._ignored_logged.update((endpoint, name) for name in new)
        logger.warning("%s: the request fields %s are not supported and were ignored (each logged once)%s",
                       endpoint, ", ".join(repr(n) for n in new),
                       "; no more are logged" if len(self._ignored_logged) >= MAX_IGNORED_LOGGED else "")

    # -- shared -----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                              param="model", code="model_not_found")

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          template_kwargs: dict | None = None, chat_template: str | None = None,
                          tools: list[ChatCompletionToolsParam] | None = None, thinking: bool = True) -> list[int]:
        """The prompt's token ids: the chat template rendered in its sandboxed worker (see
        :mod:`infera.server.chat_template`), with the request's tools; a request's own template only
        with --trust-request-chat-template.  ``thinking`` false (NoThinking): the template's
        ``enable_thinking`` is false, and a prompt that still opens ``<think>`` has it closed."""
        if chat_template is not None and not self.options.trust_request_chat_template:
            raise OpenAIError(400, "chat_template: this server renders only the model's own chat template "
                                   "(the operator may allow others with --trust-request-chat-template)",
                              param="chat_template")
        try:
            template_kwargs = check_template_kwargs(template_kwargs)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="chat_template_kwargs") from None
        if not thinking:
            template_kwargs = {**(template_kwargs or {}), "enable_thinking": False}
        try:
            ids = await self.renderer.render_ids([m.template_dict() for m in messages], add_generation_prompt,
                                                 template_kwargs, chat_template or self.chat_template,
                                                 [t.model_dump(exclude_none=True) for t in tools] if tools else None)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        if not thinking and opens_thinking(self.tokenizer, ids):
            ids += self.tokenizer.encode(NO_THINKING, add_special_tokens=False)
        return ids

    def _max_tokens(self, num_prompt: int, requested: int | None, param: str) -> int:
        """The request's max_tokens, or the server's default, within the context and the server's limit."""
        try:
            self.engine.check_prompt_length(num_prompt)
        except ValueError as e:
            raise OpenAIError(400, str(e), param=param, code="context_length_exceeded") from None
        room = self.engine.max_model_len - num_prompt
        default = self.options.max_tokens_default or self.default_sampling_params.get("max_tokens")
        limit = self.options.max_tokens_limit
        if requested is None:
            return min(room, default or room, limit or room)
        if limit is not None and requested > limit:
            raise OpenAIError(400, f"max_tokens is {requested}; this server generates at most {limit} tokens per "
                                   f"request (--max-tokens-limit)", param="max_tokens")
        if requested > room:
            raise OpenAIError(400, f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                                   f"However, you requested {num_prompt + requested} tokens ({num_prompt} in the "
                                   f"prompt, {requested} for the completion). Please reduce the length of the "
                                   f"prompt or the completion.", param="max_tokens", code="context_length_exceeded")
        return requested

    def _deadline(self, arrival: float) -> float | None:
        """When the request must end (``--request-timeout`` after arrival), on the monotonic clock."""
        limit = self.options.request_timeout
        return None if limit is None else arrival + limit

    def _timed_out(self) -> OpenAIError:
        return OpenAIError(408, f"the request ran past the server's time limit of {self.options.request_timeout:g} s "
                                f"(--request-timeout); ask for fewer tokens", code="request_timeout")

    def _params(self, req: SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            params = req.sampling_params(max_tokens, logprobs, self.default_sampling_params)
        except ValueError as e:  # SamplingParams and StructuredOutputParams name the field first
            raise OpenAIError(400, str(e), param=_field_named(req, e, req.constraint_field)) from None
        params.prompt_logprobs = req.num_prompt_logprobs
        return params

    async def submit(self, req: SamplingRequest, prompts: list[list[int]], params: SamplingParams,
                     request_id: str, prompt_field: str) -> list[RequestStream]:
        """Add every prompt to the engine; a prompt or constraint the engine refuses is a 400."""
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(ids, params, rid))
        except BaseException as e:
            for s in streams:
                s.close()
            if isinstance(e, ValueError):
                about_prompt = str(e).startswith(("prompt", "the prompt"))
                param = prompt_field if about_prompt else _field_named(req, e, req.constraint_field)
                raise OpenAIError(400, str(e), param=param) from None
            raise
        return streams

    async def outputs(self, streams: list[RequestStream], prompts: list[list[int]], arrival: float,
                      user: str | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every stream's outputs, merged, as (prompt index, output); observes metrics and writes
        one access-log line per engine request."""
        trackers = [self.metrics.track(arrival) for _ in streams]
        last: list[RequestOutput | None] = [None] * len(streams)
        status = "aborted"
        deadline = self._deadline(arrival)
        # one timer per request ends its streams at the deadline (nothing per output)
        timer = None if deadline is None else asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), self.engine.fail, [s.request_id for s in streams],
            TimeoutError("the request timed out"))
        try:
            async for i, out in _merge(streams):
                trackers[i].update(out)
                last[i] = out
                yield i, out
            status = "finished"
        except TimeoutError:
            status = "timed out"
            raise self._timed_out() from None
        except RequestFailedError as e:
            status = f"failed ({e})"
            raise OpenAIError(e.status, str(e), type="invalid_request_error" if e.status < 500 else "server_error"
                              ) from None
        except EngineDeadError as e:
            status = f"ended ({e})"
            raise OpenAIError(503, str(e), type="server_error", code="engine_dead") from None
        except Exception as e:
            status = f"failed ({e})"
            raise
        finally:
            if timer is not None:
                timer.cancel()
            now = time.monotonic()
            for stream, ids, tracker, out in zip(streams, prompts, trackers, last):
                ttft = f"{tracker.ttft:.3f}s" if tracker.ttft is not None else "-"
                reasons = ",".join(c.finish_reason or "-" for c in out.outputs) if out and out.finished else "-"
                logger.info("request %s %s: prompt %d tokens, completion %d tokens, TTFT %s, total %.3fs, "
                            "finish %s%s", stream.request_id, status, len(ids),
                            out.num_generated_tokens if out else 0, ttft, now - arrival, reasons,
                            f", user {user}" if user else "")

    def _deltas(self, out: RequestOutput, states: dict[int, ChoiceState], base: int) -> list[tuple[int, Delta]]:
        """What is new in ``out`` since the last call, per choice index (``base`` + sample index)."""
        deltas = []
        for c in out.outputs:
            st = states.setdefault(base + c.index, ChoiceState())
            if st.done:
                continue
            text, ids = c.text[st.text_len:], c.token_ids[st.num_tokens:]
            finish = c.finish_reason if c.finish_reason in ("stop", "length") else None
            if not text and not ids and finish is None:
                continue
            logprobs = c.logprobs[st.num_tokens:] if c.logprobs is not None else None
            st.text_len, st.num_tokens, st.done = len(c.text), len(c.token_ids), finish is not None
            deltas.append((base + c.index, Delta(text, ids, logprobs, finish)))
        return deltas

    def _prompt_logprobs(self, entries: list[TokenLogprobs | None], k: int) -> PromptLogprobs:
        """vLLM's ``prompt_logprobs``: per prompt token, its entry and the ``k`` most likely (token id -> entry)."""
        def entry(token_id: int, logprob: float, rank: int) -> Logprob:
            return Logprob(logprob=max(logprob, MIN_LOGPROB), rank=rank, decoded_token=self.token_text(token_id))

        return [None if e is None else {e.token_id: entry(e.token_id, e.logprob, e.rank),
                                        **{t: entry(t, v, r) for r, (t, v) in enumerate(e.top[:k], 1)}}
                for e in entries]

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    @staticmethod
    def _usage(prompts: list[list[int]], num_completion: int) -> UsageInfo:
        num_prompt = sum(len(p) for p in prompts)
        return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                         total_tokens=num_prompt + num_completion)

    @staticmethod
    async def _stream_events(events: AsyncIterator[str], streams: list[RequestStream]) -> AsyncIterator[str]:
        """SSE framing: each event, an error event if the engine fails mid-stream, then [DONE].
        However the response ends (a client that disconnects included), its requests are aborted."""
        try:
            async for event in events:
                yield sse(event)
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
            if not isinstance(e, OpenAIError):
                logger.exception("stream failed")
                e = OpenAIError(500, f"generation failed: {e}", type="server_error")
            yield sse(e.body.model_dump_json())
        finally:
            for stream in streams:
                stream.close()
        yield sse("[DONE]")

    # -- completions ------------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        arrival = time.monotonic()
        self.check_model(req.model)
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts]
        if req.max_tokens == 0 and not req.echo:  # as vLLM: 0 only echoes the prompt
            raise OpenAIError(400, "max_tokens must be at least 1, got 0 (0 is allowed with echo: the prompt is "
                                   "returned and scored, nothing generated)", param="max_tokens")
        max_tokens = min(self._max_tokens(len(p), req.max_tokens, "prompt") for p in prompts)
        params = self._params(req, max_tokens, req.logprobs)
        echoes = [self._echo(p, ids) for p, ids in zip(req.prompts, prompts)] if req.echo else None
        request_id = random_id("cmpl")
        streams = await self.submit(req, prompts, params, request_id, "prompt")
        outputs = self.outputs(streams, prompts, arrival, req.user)
        created = int(time.time())
        if req.stream:
            return self._stream_events(self._completion_events(req, request_id, created, prompts, echoes, outputs),
                                       streams)
        final: dict[int, RequestOutput] = {}
        try:
            async for i, out in outputs:
                final[i] = out
        finally:
            for stream in streams:
                stream.close()
        choices = [self._completion_choice(req, i * req.n + c.index, c, final[i], echoes[i] if echoes else None)
                   for i in sorted(final) for c in final[i].outputs]
        return CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                  usage=self._usage(prompts, sum(o.num_generated_tokens for o in final.values())))

    def _echo(self, prompt: str | list[int], ids: list[int]) -> EchoedPrompt:
        """The prompt's text (as given, or its tokens' text) and where each token's text starts in it;
        a token the text does not show (a BOS the tokenizer added) sits where the next one starts."""
        stream = self.tokenizer.decode_stream(skip_special_tokens=False)
        pieces = [self.tokenizer.step_stream(stream, t) for t in ids]
        text = prompt if isinstance(prompt, str) else "".join(pieces)
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            if text.startswith(piece, at):
                at += len(piece)
        return EchoedPrompt(text, offsets)

    def _completion_choice(self, req: CompletionRequest, index: int, c: CompletionOutput, out: RequestOutput,
                           echo: EchoedPrompt | None) -> CompletionChoice:
        """A whole choice; ``echo``: the prompt it starts with (echo)."""
        ids = req.return_token_ids
        prompt_logprobs = (self._prompt_logprobs(out.prompt_logprobs, req.prompt_logprobs)
                           if req.prompt_logprobs is not None else None)
        return CompletionChoice(index=index, text=(echo.text if echo else "") + c.text,
                                logprobs=self._completion_logprobs(req.logprobs, c.logprobs, ChoiceState(), out, echo),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                prompt_logprobs=prompt_logprobs, prompt_token_ids=out.prompt_token_ids if ids else None,
                                token_ids=list(c.token_ids) if ids else None)

    def _completion_logprobs(self, k: int | None, entries: list[TokenLogprobs] | None, state: ChoiceState,
                             out: RequestOutput, echo: EchoedPrompt | None) -> CompletionLogProbs | None:
        """The log-probabilities of a choice's new tokens (None without ``logprobs``), after the prompt's
        when ``echo`` (the first prompt token has none).  Each token's top alternatives include itself,
        as OpenAI's do (up to k + 1)."""
        if k is None:
            return None
        lp = CompletionLogProbs()

        def add(token_id: int, e: TokenLogprobs | None, offset: int) -> str:
            token = self.token_text(token_id)
            lp.tokens.append(token)
            lp.text_offset.append(offset)
            lp.token_logprobs.append(None if e is None else max(e.logprob, MIN_LOGPROB))
            lp.top_logprobs.append(None if e is None else {
                token: max(e.logprob, MIN_LOGPROB), **{self.token_text(t): max(v, MIN_LOGPROB) for t, v in e.top[:k]}})
            return token

        if echo is not None:
            for token_id, e, offset in zip(out.prompt_token_ids, out.prompt_logprobs, echo.offsets):
                add(token_id, e, offset)
            state.text_offset = len(echo.text)
        for e in entries or []:
            state.text_offset += len(add(e.token_id, e, state.text_offset))
        return lp

    async def _completion_events(self, req: CompletionRequest, request_id: str, created: int,
                                 prompts: list[list[int]], echoes: list[EchoedPrompt] | None,
                                 outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        """The stream's chunks; with echo, a choice's first chunk starts with the prompt (as vLLM's)."""
        states: dict[int, ChoiceState] = {}
        echoed: set[int] = set()
        num_completion = 0
        async for i, out in outputs:
            for index, d in self._deltas(out, states, i * req.n):
                num_completion += len(d.token_ids)
                echo = echoes[i] if echoes is not None and index not in echoed else None
                echoed.add(index)
                lp = self._completion_logprobs(req.logprobs, d.logprobs, states[index], out, echo)
                choice = CompletionChoice(index=index, text=(echo.text if echo else "") + d.text, logprobs=lp,
                                          finish_reason=d.finish_reason,
                                          token_ids=list(d.token_ids) if req.return_token_ids else None)
                usage = self._usage(prompts, num_completion) if req.continuous_usage else None
                yield CompletionResponse(id=request_id, created=created, model=self.model_name,
                                         choices=[choice], usage=usage).model_dump_json()
        if req.include_usage:
            yield CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                     usage=self._usage(prompts, num_completion)).model_dump_json()

    # -- chat completions -------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        arrival = time.monotonic()
        self.check_model(req.model)
        if req.scaling is not None:
            return await self.create_scaling_completion(req, arrival)
        prompt = await self.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                                        req.chat_template, req.tools, req.thinking)
        max_tokens = self._max_tokens(len(prompt), req.requested_max_tokens, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, top)
        reasoning = self._reasoning_parser(prompt)
        tool_parser = self._tool_parser(req)
        params.structured = self._chat_constraint(req, params.structured, reasoning, tool_parser)
        if tool_parser is not None and tool_parser.keeps_special_tokens:
            params.skip_special_tokens = False

        def output_parser() -> ChatOutputParser:
            return ChatOutputParser(reasoning, tool_parser, req.parallel_tool_calls)

        request_id = random_id("chatcmpl")
        streams = await self.submit(req, [prompt], params, request_id, "messages")
        outputs = self.outputs(streams, [prompt], arrival, req.user)
        created = int(time.time())
        if req.stream:
            return self._stream_events(self._chat_events(req, request_id, created, prompt, outputs, output_parser),
                                       streams)
        final = None
        try:
            async for _, final in outputs:
                pass
        finally:
            streams[0].close()
        ids = req.return_token_ids
        choices = []
        for c in final.outputs:
            message = output_parser().message(c.text)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._chat_logprobs(c.logprobs, top) if top is not None else None,
                                      finish_reason=_chat_finish(c.finish_reason, bool(message.tool_calls)),
                                      stop_reason=c.stop_reason, token_ids=list(c.token_ids) if ids else None))
        return ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                      usage=self._usage([prompt], final.num_generated_tokens),
                                      prompt_logprobs=self._prompt_logprobs(final.prompt_logprobs, req.prompt_logprobs)
                                      if req.prompt_logprobs is not None else None,
                                      prompt_token_ids=prompt if ids else None)

    def _reasoning_parser(self, prompt: list[int]) -> ReasoningParser | None:
        """With --reasoning-parser: the request's parser, told whether the prompt opened the thinking."""
        cls = REASONING_PARSERS.get(self.options.reasoning_parser)
        if cls is None:
            return None
        return cls(prompt_opened=opens_thinking(self.tokenizer, prompt))

    def _tool_parser(self, req: ChatCompletionRequest) -> ToolParser | None:
        """The request's tool call parser (None: tool_choice none).  A forced choice writes the
        format it forces, hermes's where the model shows none; ``auto`` needs the model's own."""
        mode = req.tool_choice_mode
        if mode == "none":
            return None
        if self.tool_call_parser is None and mode == "auto":
            raise OpenAIError(400, "tool_choice auto needs the model's tool call format, which its chat template "
                                   "does not show: start the server with --tool-call-parser, or force a call with "
                                   "tool_choice required or a named function", param="tool_choice")
        return TOOL_PARSERS[self.tool_call_parser or "hermes"]()

    @staticmethod
    def _chat_constraint(req: ChatCompletionRequest, structured: StructuredOutputParams | None,
                         reasoning: ReasoningParser | None, tool_parser: ToolParser | None
                         ) -> StructuredOutputParams | None:
        """The output constraint: the forced tool calls in the parser's format, or the request's
        structured output; with a reasoning parser, applied after the thinking."""
        forced = req.forced_tools
        try:
            if forced is not None:
                parallel = req.parallel_tool_calls and req.tool_choice_mode == "required"
                calls = tool_parser.calls_format([(f.name, f.arguments_schema) for f in forced], parallel)
                if reasoning is not None:
                    return reasoning.constrain(calls)
                return StructuredOutputParams(structural_tag=json.dumps({"type": "structural_tag", "format": calls}))
            if structured is not None and reasoning is not None:
                return reasoning.constrain(structured)
        except (TypeError, ValueError, RecursionError) as e:
            raise OpenAIError(400, f"invalid output constraint: {e}", param=req.constraint_field) from None
        return structured

    async def create_scaling_completion(self, req: ChatCompletionRequest, arrival: float
                                        ) -> ScalingChatCompletionResponse:
        """Answer with an inference-time scaling method (``scaling``: method, budget, reward,
        options); the request's temperature, top_p, seed and max_tokens are search options."""
        spec = req.scaling
        options = spec.options
        for name, value in (("temperature", req.temperature), ("top_p", req.top_p), ("seed", req.seed),
                            ("max_tokens", req.requested_max_tokens)):
            if value is not None:
                options.setdefault(name, value)
        prompt = await self.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                                        req.chat_template)
        messages = [m.template_dict() for m in req.messages]
        try:
            check_scaling_work(spec.budget, options, self.engine.max_model_len)
            reward = self._reward(spec.reward)
            if isinstance(reward, Reward) and not self.engine.in_process:
                raise ValueError("reward models run in the server process, and the searches on engine replicas "
                                 "(--data-parallel-size > 1): use a built-in reward (arithmetic, self)")
        except ValueError as e:
            raise OpenAIError(400, f"scaling: {e}", param="scaling") from None
        # built and run on the engine thread (see infera.scaling.controller)
        job = SearchJob(lambda engine: build_search(engine, messages, spec.method, spec.budget, reward, options,
                                                    rendered=prompt))
        deadline = self._deadline(arrival)
        try:
            await asyncio.wait_for(self.engine.run_job(job), None if deadline is None else deadline - time.monotonic())
        except TimeoutError:
            raise self._timed_out() from None
        except ValueError as e:
            raise OpenAIError(400, f"scaling: {e}", param="scaling") from None
        return self._scaling_response(job.outcome, arrival, req.user)

    def _reward(self, name: str | None) -> Reward | str | None:
        """A request's reward: built in (``arithmetic``, ``self``) or one of the operator's reward models
        (``model:NAME``, see ``--reward-model``); a client never names a path."""
        if name is None or not name.startswith("model:"):
            return name
        model = self.reward_models.get(name.removeprefix("model:"))
        if model is None:
            served = ", ".join(f"model:{n}" for n in self.reward_models) or "none"
            raise ValueError(f"reward {name!r} is not served here; reward models: {served} (the operator adds them "
                             f"with --reward-model NAME=PATH)")
        return model

    def _scaling_response(self, outcome: SearchOutcome, arrival: float, user: str | None
                          ) -> ScalingChatCompletionResponse:
        if isinstance(outcome.error, ValueError):
            raise OpenAIError(400, f"scaling: {outcome.error}", param="scaling")
        if outcome.error is not None:
            raise OpenAIError(500, f"scaling search failed: {outcome.error}", type="server_error")
        result = outcome.result
        num_prompt = outcome.num_prompt_tokens
        logger.info("scaling %s %s (budget %d) finished: answer %r, %d generated + %d prefilled tokens, %.3fs%s",
                    outcome.search_id, result.method, result.budget, result.answer, result.generated_tokens,
                    result.prefill_tokens, time.monotonic() - arrival, f", user {user}" if user else "")
        choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason="stop")
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=result.generated_tokens,
                          total_tokens=num_prompt + result.generated_tokens)
        return ScalingChatCompletionResponse(id=random_id("chatcmpl"), model=self.model_name, choices=[choice],
                                             usage=usage, scaling=result.summary())

    def _chat_logprobs(self, entries: list[TokenLogprobs] | None, k: int) -> ChatLogprobs:
        content = []
        for e in entries or []:
            token = self.token_text(e.token_id)
            alternatives = [TopLogprob(token=(t := self.token_text(tid)), logprob=max(v, MIN_LOGPROB),
                                       bytes=list(t.encode())) for tid, v in e.top[:k]]
            content.append(ChatLogprobToken(token=token, logprob=max(e.logprob, MIN_LOGPROB),
                                            bytes=list(token.encode()), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    async def _chat_events(self, req: ChatCompletionRequest, request_id: str, created: int, prompt: list[int],
                           outputs: AsyncIterator[tuple[int, RequestOutput]],
                           output_parser: Callable[[], ChatOutputParser]) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            if usage is None and req.continuous_usage:  # the usage so far
                usage = self._usage([prompt], num_completion)
            return ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                       usage=usage).model_dump_json()

        top = (req.top_logprobs or 0) if req.logprobs else None
        num_completion = 0
        for index in range(req.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        states: dict[int, ChoiceState] = {}
        parsers: dict[int, ChatOutputParser] = {}
        async for _, out in outputs:
            for index, d in self._deltas(out, states, 0):
                num_completion += len(d.token_ids)
                parser = parsers.setdefault(index, output_parser())
                deltas = parser.deltas(d.text, final=d.finish_reason is not None) or [DeltaMessage()]
                lp = self._chat_logprobs(d.logprobs, top) if top is not None else None
                token_ids = list(d.token_ids) if req.return_token_ids else None
                if deltas == [DeltaMessage()] and d.finish_reason is None and lp is None and token_ids is None:
                    continue  # all held back (a tool call's name, a marker being written)
                for i, delta in enumerate(deltas):
                    last = i == len(deltas) - 1
                    yield chunk([ChatStreamChoice(
                        index=index, delta=delta, logprobs=lp if i == 0 else None,
                        finish_reason=_chat_finish(d.finish_reason, parser.called) if last else None,
                        token_ids=token_ids if i == 0 else None)])
        if req.include_usage:
            yield chunk([], self._usage([prompt], num_completion))


def _field_named(req: SamplingRequest, error: ValueError, default: str | None) -> str | None:
    """The request field an error names first (``logit_bias: ...``, ``top_k must ...``), else ``default``."""
    field = str(error).split(" ", 1)[0].rstrip(":")
    return field if field in type(req).model_fields else default


def _chat_finish(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for an output that stopped after calling tools."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def check_scaling_work(budget: int, options: dict, max_model_len: int) -> None:
    """Bound a scaling request's work: lengths within the context, budget x max_tokens within MAX_SCALING_TOKENS."""
    for name in ("max_tokens", "step_max_tokens", "max_steps"):
        value = options.get(name)
        if isinstance(value, int) and value > max_model_len:
            raise ValueError(f"{name} is {value}; at most the context length, {max_model_len}")
    max_tokens = options.get("max_tokens", SearchConfig.max_tokens)
    if isinstance(max_tokens, int) and budget * max_tokens > MAX_SCALING_TOKENS:
        raise ValueError(f"budget x max_tokens is {budget * max_tokens} tokens; at most {MAX_SCALING_TOKENS} per "
                         f"request")


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
