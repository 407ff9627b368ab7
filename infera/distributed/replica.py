"""One engine replica: a Ray actor holding a whole engine (worker, scheduler, engine thread).

The actor is asynchronous: its methods run on the actor's event loop, where an
:class:`AsyncLLMEngine` streams the engine thread's outputs, as in the one-process server.  A
request's outputs wait in a buffer until the front polls them (:meth:`EngineReplica.poll`, a long
poll): outputs are cumulative, so a poll returns only the latest, and a slow front skips the ones
in between instead of queueing them.  Errors cross the process boundary as :class:`ReplicaError`
values, not exceptions, so that the front raises the same exception types as the one-process server.

Disaggregated prefill and decode: a prefill replica computes the KV of a prompt's full blocks
(:meth:`EngineReplica.prefill`, a request of one token whose output is dropped) and returns it as
a :class:`KVTransfer`; a decode replica is handed a reference to it with the request
(:meth:`EngineReplica.add_request`), fetches it from Ray's object store (from the prefill replica's,
not through the front), writes it into its cache and runs the request, which finds the prompt's
blocks as prefix hits: it computes the rest of the prompt (less than a block and the last token),
samples and streams.  Sampling, n > 1, structured output and logprobs thus run on the decode side
only, as on one engine.  If the KV does not arrive (the prefill replica failed), the decode replica
computes the whole prompt itself.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from infera.config import EngineConfig
from infera.engine.async_engine import (AsyncLLMEngine, EngineDeadError, QueueFullError, RequestFailedError,
                                        RequestStream, run_on_fresh_thread)
from infera.engine.kv_connector import KVTransfer
from infera.engine.llm_engine import LLMEngine
from infera.outputs import RequestOutput
from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams
from infera.scaling.controller import SearchJob, SearchOutcome
from infera.scaling.search import Search

logger = logging.getLogger(__name__)


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


class _SendKV:
    """An engine job: the KV of a prompt's cached blocks, read on the engine thread."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.transfer: KVTransfer | None = None

    def start(self, engine: LLMEngine, done: Callable[[], None]) -> None:
        self.transfer = engine.worker.kv_connector.send(self.prompt)
        done()

    def cancel(self) -> None:
        """Nothing to stop: it ends as it starts."""


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
                "prefix_cache_tokens": engine.worker.prefix_cache_tokens,
                "max_model_len": engine.max_model_len}

    async def health(self) -> dict[str, float] | None:
        """The engine's stats, or None when its thread has stopped (the actor should be restarted)."""
        engine = self._started()
        return {**engine.stats, "requests": engine.num_requests} if engine.is_running else None

    async def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | PoolingParams,
                          kv: tuple[ray.ObjectRef, ...] = ()) -> ReplicaError | None:
        """Queue a request; its outputs are then polled.  Returns why it was refused, if it was.  ``kv``:
        a reference to its prompt's KV from a prefill replica (in a tuple, so that Ray passes it unresolved)."""
        transfer = await self._fetch(request_id, kv[0]) if kv else None
        try:
            stream = await self._started().add_request(prompt, params, request_id, transfer)
        except Exception as e:  # noqa: BLE001 - handed to the front as a value
            return ReplicaError.of(e)
        if request_id in self._aborted:
            self._aborted.discard(request_id)
            stream.close()
            return ReplicaError("failed", "the request was aborted")
        pending = self._pending[request_id] = _Pending(stream)
        pending.task = asyncio.create_task(self._drain(pending))
        return None

    @staticmethod
    async def _fetch(request_id: str, ref: ray.ObjectRef) -> KVTransfer | None:
        try:
            transfer = await ref
        except Exception as e:  # noqa: BLE001 - the prefill replica failed: the prompt is computed here
            logger.warning("request %s: its KV did not arrive (%s); computing its prompt here", request_id,
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        return transfer if isinstance(transfer, KVTransfer) else None

    async def prefill(self, request_id: str, prompt: list[int]) -> tuple[dict[str, int] | ReplicaError,
                                                                         KVTransfer | None]:
        """Compute the KV of ``prompt`` (cached prefix blocks are reused) and return it: ``(sizes,
        transfer)``, called with ``num_returns=2`` so that the front waits for the small first value and
        the decode replica fetches the second; ``(error, None)`` when it failed."""
        engine = self._started()
        try:
            stream = await engine.add_request(prompt, SamplingParams(max_tokens=1), request_id)
            async for _ in stream:
                pass
            job = _SendKV(prompt)
            await engine.run_job(job)
        except Exception as e:  # noqa: BLE001 - handed to the front as a value
            return ReplicaError.of(e), None
        transfer = job.transfer
        return {"blocks": transfer.num_blocks if transfer else 0, "bytes": transfer.nbytes if transfer else 0}, transfer

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
