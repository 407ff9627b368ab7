"""One engine replica: a Ray actor holding a whole engine (worker, scheduler, engine thread).

The actor is asynchronous: its methods run on the actor's event loop, where an
:class:`AsyncLLMEngine` streams the engine thread's outputs, as in the one-process server.  A
request's outputs wait in a buffer until the front polls them (:meth:`EngineReplica.poll`, a long
poll): outputs are cumulative, so a poll returns only the latest, and a slow front skips the ones
in between instead of queueing them.  Errors cross the process boundary as :class:`ReplicaError`
values, not exceptions, so that the front raises the same exception types as the one-process server.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from infera.config import EngineConfig
from infera.engine.async_engine import (AsyncLLMEngine, EngineDeadError, QueueFullError, RequestFailedError,
                                        RequestStream, run_on_fresh_thread)
from infera.engine.llm_engine import LLMEngine
from infera.outputs import RequestOutput
from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams
from infera.scaling.controller import SearchJob, SearchOutcome
from infera.scaling.search import Search


@dataclass(frozen=True)
class ReplicaError:
    """An exception raised on a replica, as a value: ``kind`` names its type."""

    kind: str  # invalid | busy | dead | failed | lost (not on this replica: it restarted since)
    message: str
    status: int = 500

    @classmethod
    def of(cls, e: BaseException) -> ReplicaError:
        if isinstance(e, RequestFailedError):
            return cls("failed", str(e), e.status)
        for kind, types in (("invalid", ValueError), ("busy", QueueFullError), ("dead", EngineDeadError)):
            if isinstance(e, types):
                return cls(kind, str(e))
        return cls("failed", f"{type(e).__name__}: {e}")

    def exception(self) -> Exception:
        if self.kind in ("failed", "lost"):
            return RequestFailedError(self.message, self.status)
        return {"invalid": ValueError, "busy": QueueFullError, "dead": EngineDeadError}[self.kind](self.message)


@dataclass(eq=False)
class _Pending:
    """A request's outputs not yet polled: the latest one, or the error that ended it."""

    stream: RequestStream
    latest: RequestOutput | None = None
    error: ReplicaError | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class EngineReplica:
    """An :class:`LLMEngine` built from ``config`` on ``threads`` torch threads, served to a
    :class:`~infera.distributed.replica_pool.ReplicaPool` (run as ``ray.remote(EngineReplica)``)."""

    def __init__(self, config: EngineConfig, threads: int, max_waiting_requests: int | None = None):
        torch.set_num_threads(threads)
        engine = run_on_fresh_thread(LLMEngine, config)
        run_on_fresh_thread(lambda: engine.structured.compiler)  # reads the vocabulary (~0.15 s): now, once
        self.engine = AsyncLLMEngine(engine, max_waiting_requests)
        self._pending: dict[str, _Pending] = {}
        self._aborted: set[str] = set()  # aborted while being added

    def _started(self) -> AsyncLLMEngine:
        """The async engine, its thread started on this event loop on first use (also after a restart)."""
        if self.engine._thread is None:
            self.engine.start()
        return self.engine

    async def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {"model_path": engine.model_path, "dtype": str(engine.dtype).removeprefix("torch."),
                "device": str(engine.device), "kv_cache_tokens": engine.worker.kv_cache_tokens,
                "max_model_len": engine.max_model_len}

    async def health(self) -> dict[str, float] | None:
        """The engine's stats, or None when its thread has stopped (the actor should be restarted)."""
        engine = self._started()
        return {**engine.stats, "requests": engine.num_requests} if engine.is_running else None

    async def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | PoolingParams
                          ) -> ReplicaError | None:
        """Queue a request; its outputs are then polled.  Returns why it was refused, if it was."""
        try:
            stream = await self._started().add_request(prompt, params, request_id)
        except Exception as e:  # noqa: BLE001 - handed to the front as a value
            return ReplicaError.of(e)
        if request_id in self._aborted:
            self._aborted.discard(request_id)
            stream.close()
            return ReplicaError("failed", "the request was aborted")
        pending = self._pending[request_id] = _Pending(stream)
        pending.task = asyncio.create_task(self._drain(pending))
        return None

    async def _drain(self, pending: _Pending) -> None:
        try:
            async for out in pending.stream:
                pending.latest = out
                pending.ready.set()
        except Exception as e:  # noqa: BLE001 - handed to the front as a value
            pending.error = ReplicaError.of(e)
            pending.ready.set()

    async def poll(self, request_id: str) -> tuple[RequestOutput | None, ReplicaError | None]:
        """The request's latest output since the last poll, or the error that ended it; waits for one."""
        pending = self._pending.get(request_id)
        if pending is None:
            return None, ReplicaError("lost", f"request {request_id} is not on this replica")
        await pending.ready.wait()
        pending.ready.clear()
        out, error, pending.latest = pending.latest, pending.error, None
        if error is not None or (out is not None and out.finished):
            del self._pending[request_id]
        return out, error

    async def run_job(self, build: Callable[[LLMEngine], Search]) -> SearchOutcome | ReplicaError:
        """A scaling search built by ``build`` on this engine, run to its end (cancelling the call
        cancels it)."""
        job = SearchJob(build)
        try:
            await self._started().run_job(job)
        except Exception as e:  # noqa: BLE001 - handed to the front as a value
            return ReplicaError.of(e)
        return job.outcome

    async def abort(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            self._aborted.add(request_id)
        else:
            pending.task.cancel()  # leaving the stream aborts the request on the engine thread
            pending.error = ReplicaError("failed", "the request was aborted")
            pending.ready.set()
