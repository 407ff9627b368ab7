"""The OpenAI-compatible HTTP server: FastAPI app, routes, error handling, and ``infera serve``."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infera.config import EngineConfig, ParallelConfig
from infera.engine.async_engine import (AsyncLLMEngine, EngineDeadError, QueueFullError, RequestFailedError,
                                        run_on_fresh_thread)
from infera.server.metrics import ServerMetrics
from infera.server.options import ServerConfig, ServerOptions, host_name
from infera.scaling.rewards import Reward
from infera.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                    ModelCard, ModelList, OpenAIError, OpenAIModel, TokenizeRequest, TokenizeResponse)
from infera.server.protocol_embedding import EmbeddingRequest, EmbeddingResponse
from infera.server.protocol_responses import ResponsesRequest, ResponsesResponse
from infera.server.serving import OpenAIServing
from infera.server.serving_embedding import OpenAIServingEmbedding
from infera.server.serving_responses import OpenAIServingResponses

if TYPE_CHECKING:
    from infera.distributed.replica_pool import ReplicaPool

logger = logging.getLogger("infera.server")

# Reachable without the API key.
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 500, 503)}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return _render(OpenAIError(status, message, type, param, code))


def _render(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body.model_dump(), status_code=e.status)


class APIKeyMiddleware:
    """401 unless ``Authorization: Bearer KEY`` (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostCheckMiddleware:
    """400 unless the Host header names an allowed host (DNS-rebinding defence for keyless loopback servers)."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]):
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(Headers(scope=scope).get("host", "")).lower()
            if host not in self.allowed:
                response = error_response(400, f"Host {host!r} is not served here; allowed: "
                                               f"{', '.join(sorted(self.allowed))} (see --allowed-hosts)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes, whether it declares its length or streams it.
    The body is read here (the app reads it whole anyway) and replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[bytes] = []
        size = 0
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_large = size > self.limit
            if not message.get("more_body", False):
                break
        if too_large:
            response = error_response(413, f"The request body is over {self.limit} bytes "
                                           f"(--max-request-body-bytes).", code="request_too_large")
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    # in a union, the members the value is not of the type of say least: prefer what is wrong with the value
    err = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    # pydantic names the union member it tried ("str", "list[str]", ...): not part of the parameter
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"The request body is not valid JSON: {detail}".rstrip(": "), None
    message = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if param is None and err.get("type") == "missing":
        return "The request body is missing; send a JSON object.", None
    return (f"{param}: {message}" if param else message), param


def _is_type_tag(part: str | int) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or any(c in part for c in "[-"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return _render(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(QueueFullError)
    async def _busy(_: Request, e: QueueFullError) -> JSONResponse:
        response = error_response(503, str(e), type="server_error", code="server_overloaded")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)  # clients (openai's included) wait this long
        return response

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), type="server_error", code="engine_dead")

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, e: RequestFailedError) -> JSONResponse:
        return error_response(e.status, str(e), type="invalid_request_error" if e.status < 500 else "server_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, f"{e.detail}: {request.method} {request.url.path}", type=kind)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")


async def _until_disconnect(raw: Request, work: Awaitable[Any]) -> Any:
    """Run ``work`` unless the client goes away first; then cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it abort its requests
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: AsyncLLMEngine | ReplicaPool, model_name: str, options: ServerOptions | None = None,
              reward_models: dict[str, Reward] | None = None) -> FastAPI:
    """The FastAPI app over a not-yet-started async engine or replica pool (the app's lifespan starts
    and stops it).  ``reward_models``: the operator's reward models by name (scaling requests' ``model:NAME``)."""
    options = options or ServerOptions()
    metrics = ServerMetrics(lambda: engine.stats, model_name,
                            (lambda: engine.replica_stats) if hasattr(engine, "replica_stats") else None)
    serving = OpenAIServing(engine, model_name, metrics, options, reward_models)
    embedding = OpenAIServingEmbedding(serving)
    responses = OpenAIServingResponses(serving)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        await engine.warm_up()
        yield
        engine.shutdown()
        serving.renderer.close()

    app = FastAPI(title="infera", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    # the last added runs first: CORS, the Host check, then the key, then the body limit
    app.add_middleware(BodyLimitMiddleware, limit=options.max_request_body_bytes)
    if options.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=options.api_key)
    if options.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=options.allowed_hosts)
    if options.allowed_origins is not None:  # outermost: errors carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                           allow_methods=options.allowed_methods, allow_headers=options.allowed_headers,
                           allow_credentials=options.allow_credentials)

    def respond(result: Any) -> Response:
        if isinstance(result, Response):
            return result
        if isinstance(result, AsyncIterator):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(result.model_dump())

    async def answer(raw: Request, request: OpenAIModel, work: Awaitable[Any]) -> Response:
        """A POST endpoint's answer: its ignored fields logged, ``work`` run until the client leaves."""
        serving.note_ignored(raw.url.path, request)
        return respond(await _until_disconnect(raw, work))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        """Text completion; ``stream: true`` answers with server-sent events."""
        return await answer(raw, request, serving.create_completion(request))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        """Chat completion with the model's chat template; ``stream: true`` answers with server-sent events."""
        return await answer(raw, request, serving.create_chat_completion(request))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def embeddings(request: EmbeddingRequest, raw: Request) -> Response:
        """Embeddings of the inputs: final hidden states pooled as --pooler-config says."""
        return await answer(raw, request, embedding.create_embedding(request))

    @app.post("/v1/responses", response_model=ResponsesResponse, responses=ERROR_RESPONSES)
    async def create_response(request: ResponsesRequest, raw: Request) -> Response:
        """OpenAI's Responses API, stateless; ``stream: true`` answers with its server-sent events."""
        return await answer(raw, request, responses.create_responses(request))

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, root=model_name, max_model_len=engine.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return error_response(503, f"the engine is not running ({engine.error})", type="server_error")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        serving.note_ignored("/tokenize", request)
        serving.check_model(request.model)
        if request.messages is not None:
            tokens = await serving.chat_prompt(request.messages, request.add_generation_prompt, tools=request.tools)
        else:
            tokens = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        serving.note_ignored("/detokenize", request)
        serving.check_model(request.model)
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token ids must be in [0, {vocab}), got {bad[:3]}", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))

    return app


class InferaServer(uvicorn.Server):
    """uvicorn with a graceful drain: on SIGTERM/SIGINT no new connection or request is taken, running
    requests get ``shutdown_timeout`` seconds to finish, then the rest end with a 503 (streams: an error
    event and ``[DONE]``).  ``banner(port)`` runs once the socket is bound (so the port shown is real)."""

    def __init__(self, app: FastAPI, host: str, port: int, shutdown_timeout: float, log_level: str = "info",
                 banner: Callable[[int], None] | None = None):
        # uvicorn's own grace is a backstop, after ours has ended every request
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=shutdown_timeout + 5))
        self.engine: AsyncLLMEngine | ReplicaPool = app.state.engine
        self.shutdown_timeout = shutdown_timeout
        self.banner = banner

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.banner is not None:
            self.banner(self.port)

    async def shutdown(self, sockets: list | None = None) -> None:
        self.engine.draining = True
        running = self.engine.num_requests
        if running:
            logger.info("shutting down: %d requests running get %gs to finish (--shutdown-timeout)", running,
                        self.shutdown_timeout)
        error = EngineDeadError(f"the server is shutting down (the request did not finish within "
                                f"--shutdown-timeout {self.shutdown_timeout:g}s)")
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.engine.fail_all, error)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(engine_config: EngineConfig, config: ServerConfig, options: ServerOptions,
               log_level: str = "info", parallel: ParallelConfig | None = None) -> None:
    """``infera serve``: load the model (in one engine, or in the replicas ``parallel`` asks for), then serve it
    until Ctrl-C or SIGTERM."""
    from infera.engine.llm_engine import LLMEngine
    from infera.scaling.reward_model import load_reward_model

    if parallel is not None and parallel.uses_ray:
        from infera.distributed.replica_pool import ReplicaPool

        front: AsyncLLMEngine | ReplicaPool = ReplicaPool(engine_config, parallel, config.max_waiting_requests)
        info = front.info[0]
        replicas = (f"{parallel.prefill_replicas} prefill + {parallel.decode_replicas} decode replicas"
                    if parallel.disaggregated else f"{parallel.data_parallel_size} replicas")
        model_path, where = info["model_path"], (
            f"{replicas} (Ray actors, {parallel.threads_per_replica} threads each, "
            f"{parallel.routing_policy} routing), {info['dtype']} on {info['device']}, "
            f"KV cache {info['kv_cache_tokens']} tokens each")
    else:
        engine = run_on_fresh_thread(LLMEngine, engine_config)  # the engine thread alone runs torch
        front = AsyncLLMEngine(engine, config.max_waiting_requests)
        model_path, where = engine.model_path, (f"{str(engine.dtype).removeprefix('torch.')} on {engine.device}, "
                                                f"KV cache {engine.worker.kv_cache_tokens} tokens")
    rewards = {name: run_on_fresh_thread(load_reward_model, path) for name, path in options.reward_models.items()}
    name = config.served_model_name or Path(model_path).stem
    app = build_app(front, name, options, rewards)

    def banner(port: int) -> None:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        url = f"http://{host}:{port}"
        body = {"model": name, "messages": [{"role": "user", "content": "Hello! Who are you?"}], "max_tokens": 64}
        auth = ' -H "Authorization: Bearer $INFERA_API_KEY"' if options.api_key else ""
        logger.info("serving %s as '%s': %s, context %d tokens, up to %d sequences", model_path, name, where,
                    front.max_model_len, engine_config.max_num_seqs)
        if rewards:
            logger.info("reward models for scaling requests: %s", ", ".join(f"model:{n}" for n in rewards))
        logger.info("limits: max_tokens default %s, limit %s; request timeout %s; body %d bytes; hosts %s",
                    options.max_tokens_default or "rest of the context", options.max_tokens_limit or "none",
                    f"{options.request_timeout:g}s" if options.request_timeout else "none",
                    options.max_request_body_bytes,
                    ", ".join(options.allowed_hosts) if options.allowed_hosts is not None else "any")
        logger.info("listening on http://%s:%d (OpenAI API at %s/v1, metrics at %s/metrics)", config.host, port,
                    url, url)
        logger.info("try it:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json'%s -d %s",
                    url, auth, shlex.quote(json.dumps(body)))

    InferaServer(app, config.host, config.port, options.shutdown_timeout, log_level.lower(), banner).run()
