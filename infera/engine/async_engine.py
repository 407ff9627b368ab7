"""An asyncio front for :class:`LLMEngine`, used by the server.

The synchronous engine runs in one dedicated thread and is touched from nowhere else: requests
to add or abort reach it through a thread-safe queue, and each step's outputs come back to the
event loop with ``loop.call_soon_threadsafe``, where they are routed to per-request asyncio
queues.  With nothing to run, the thread blocks on the request queue (no polling).

Torch work belongs on the engine thread alone.  libgomp gives every thread that starts a parallel
region its own team of worker threads for as long as that thread lives, and once more threads are
in teams than there are cores it cuts every worker's spin-wait to ~100 iterations, so each parallel
region pays a futex wake-up (measured here: an elementwise op 19 -> 55 us, serving 0.86x offline).
Work that must run elsewhere (loading the model, a reward model) goes through
:func:`run_on_fresh_thread`, whose team ends with its thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from infera.engine.kv_connector import KVTransfer
from infera.engine.llm_engine import LLMEngine
from infera.outputs import RequestOutput
from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams
from infera.structured import CompileQueueFullError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_on_fresh_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends with it (see the module docstring):
    the caller keeps no OpenMP team. Returns its result or raises its exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            error.append(e)

    thread = threading.Thread(target=target, name="infera-load", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can run."""


class RequestFailedError(RuntimeError):
    """Handling this request failed and it was aborted: ``status`` 400 when the failure was its
    own (the engine attributed it), 500 when the whole step failed."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


# Engine steps that may fail in a row before the engine calls itself unhealthy (/health: 503).
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams | PoolingParams
    done: asyncio.Future  # settled once the engine has taken the request (or refused it)
    kv: KVTransfer | None = None  # its prompt's KV computed elsewhere, written into the cache first


@dataclass
class _Abort:
    request_id: str


class EngineJob(Protocol):
    """Work that runs inside the engine loop (through an engine driver, e.g. a scaling search):
    started and cancelled on the engine thread, which calls ``done()`` when it has ended."""

    def start(self, engine: LLMEngine, done: Callable[[], None]) -> None: ...

    def cancel(self) -> None: ...


@dataclass(eq=False)
class _Job:
    job: EngineJob
    done: asyncio.Future  # settled once the job has ended (or was refused)
    cancel: bool = False  # the op that cancels it


_STOP = object()


@dataclass
class RequestStream:
    """One request's outputs, in order. Iterate it to get each new :class:`RequestOutput`
    (cumulative, as the engine makes them); leaving the iteration early aborts the request."""

    request_id: str
    engine: AsyncLLMEngine
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request unless it finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
        self.engine._streams.pop(self.request_id, None)

    def __del__(self) -> None:  # a stream dropped before it was iterated still frees its blocks
        if not self.finished:
            self.engine.abort(self.request_id)


class AsyncLLMEngine:
    """Runs ``engine.step()`` in a background thread and streams outputs to asyncio callers.

    ``max_waiting_requests`` bounds the scheduler's waiting queue: a request that would go past
    it is refused with :class:`QueueFullError`.
    """

    in_process = True  # jobs run in this process (the replica pool's run on replicas)

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None):
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.engine = engine
        self.config, self.tokenizer = engine.config, engine.tokenizer
        self.default_sampling_params = engine.default_sampling_params
        self.max_model_len = engine.max_model_len
        self.check_prompt_length = engine.check_prompt_length  # pure: reads max_model_len only
        self.max_waiting_requests = max_waiting_requests
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._jobs: set[_Job] = set()  # likewise: jobs not ended yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = self._read_stats()
        self.error: BaseException | None = None
        self.step_failures = 0  # in a row
        self.draining = False  # shutting down: no new requests

    # -- event-loop side ------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="infera-engine", daemon=True)
        self._thread.start()

    async def warm_up(self) -> None:
        """Read the vocabulary into the grammar compiler (~0.15 s): now, not in the first constrained request."""
        await asyncio.to_thread(lambda: self.engine.structured.compiler)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._ops.put(_STOP)
            self._thread.join()
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_requests(self) -> int:
        """Requests with an open stream."""
        return len(self._streams)

    @property
    def stats(self) -> dict[str, float]:
        """The engine's stats as of its last step, plus prompt/generation token counters."""
        return self._stats

    async def add_request(self, prompt: str | list[int], params: SamplingParams | PoolingParams,
                          request_id: str, kv: KVTransfer | None = None) -> RequestStream:
        """Queue a request (:class:`PoolingParams`: an embedding request). Raises ValueError (the engine
        refused it), QueueFullError or EngineDeadError before any output, so the caller can answer with
        an error status.  ``kv``: KV blocks of the prompt computed elsewhere (disaggregated prefill),
        received into the cache just before the request is queued, so it finds them as prefix hits."""
        self._check_accepting()
        try:  # off the engine thread, with a time limit; add_request then finds it compiled
            if isinstance(params, SamplingParams):
                await self.engine.structured.compile_async(params)
        except CompileQueueFullError as e:
            raise QueueFullError(str(e)) from None
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        self._ops.put(_Add(request_id, prompt, params, accepted, kv))
        try:
            if self.error is not None:  # the thread died after the check above
                raise EngineDeadError(f"the engine is not running ({self.error})")
            await accepted
        except BaseException:
            stream.close()  # cancelled while queued: the abort follows the add on the queue
            raise
        return stream

    def _check_accepting(self) -> None:
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'not started'})")
        if self.draining:
            raise EngineDeadError("the server is shutting down; retry on another replica or after the restart")

    async def run_job(self, job: EngineJob) -> None:
        """Run ``job`` on the engine thread until it ends; cancelling the caller cancels the job.
        Raises QueueFullError or EngineDeadError, or the job's error from ``start``."""
        self._check_accepting()
        op = _Job(job, self._loop.create_future())
        self._jobs.add(op)
        self._ops.put(op)
        try:
            await op.done
        except asyncio.CancelledError:
            self._ops.put(_Job(job, op.done, cancel=True))
            raise
        finally:
            self._jobs.discard(op)

    def fail(self, request_ids: list[str], error: BaseException) -> None:
        """End these requests now with ``error`` (their streams raise it) and abort them (event loop only)."""
        for request_id in request_ids:
            self.abort(request_id)
        self._fail(request_ids, error)

    def fail_all(self, error: BaseException) -> None:
        """End every request and job now with ``error`` (streams and callers raise it) and abort
        them (event loop only)."""
        self.fail(list(self._streams), error)
        for op in list(self._jobs):
            self._ops.put(_Job(op.job, op.done, cancel=True))
            _settle(op.done, error)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, reentrant: callable from ``__del__``)."""
        self._ops.put(_Abort(request_id))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                failed = out.error is not None
                stream.queue.put_nowait(RequestFailedError(f"the request failed ({out.error})", 400) if failed
                                        else out)

    def _fail(self, request_ids: list[str] | None, error: BaseException) -> None:
        for rid in list(self._streams) if request_ids is None else request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait(error)

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self._stats = self._read_stats()
                    if not self._apply(self._ops.get()):  # idle: sleep until a request arrives
                        return
                while True:
                    try:
                        op = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if not self._apply(op):
                        return
                if engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - the thread must report any failure
            logger.exception("the engine thread failed")
            self.error = e
            dead = EngineDeadError(f"engine failed: {e}")
            self._loop.call_soon_threadsafe(self._fail, None, dead)
            while True:  # settle adds still queued, so that no caller waits forever
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if isinstance(op, _Add | _Job):
                    self._loop.call_soon_threadsafe(_settle, op.done, dead)

    def _apply(self, op: Any) -> bool:
        if op is _STOP:
            return False
        if isinstance(op, _Abort):
            self.engine.abort_request(op.request_id)
            return True
        if isinstance(op, _Job) and op.cancel:
            op.job.cancel()
            return True
        error: BaseException | None = None
        try:
            waiting = self.engine.stats["waiting"]
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"the server is busy: {waiting} requests are waiting "
                                     f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
            if isinstance(op, _Job):
                loop, done = self._loop, op.done
                op.job.start(self.engine, lambda: loop.call_soon_threadsafe(_settle, done, None))
                return True
            if op.kv is not None:
                self._receive(op)
            self.engine.add_request(op.prompt, op.params, op.request_id)
        except (ValueError, QueueFullError) as e:
            error = e
        except Exception as e:  # noqa: BLE001 - whatever one request causes ends that request, not the thread
            logger.exception("%s could not be queued", "a job" if isinstance(op, _Job) else f"request {op.request_id}")
            if isinstance(op, _Add):
                self.engine.abort_request(op.request_id)
            error = ValueError(f"the request could not be accepted ({type(e).__name__}: {e})")
        self._loop.call_soon_threadsafe(_settle, op.done, error)
        return True

    def _receive(self, op: _Add) -> None:
        """Write a request's KV blocks into the cache; blocks that do not fit, or KV of another layout,
        are computed here instead."""
        try:
            written = self.engine.worker.kv_connector.receive(op.kv)
        except ValueError as e:
            logger.warning("request %s: its KV blocks were not taken (%s); its prompt is computed here",
                           op.request_id, e)
            return
        logger.debug("request %s: %d of %d KV blocks received (%d bytes)", op.request_id, written,
                     op.kv.num_blocks, op.kv.nbytes)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving the others
            self.step_failures += 1
            unhealthy = self.step_failures >= MAX_CONSECUTIVE_STEP_FAILURES
            # the step's requests; all of them once the engine gives up (so that nothing waits forever)
            failed = sorted(self.engine.requests if unhealthy
                            else {seq.request_id for seq in self.engine.scheduler.running})
            logger.exception("engine step failed (%d in a row); aborting %d requests", self.step_failures,
                             len(failed))
            for rid in failed:
                self.engine.abort_request(rid)
            self._loop.call_soon_threadsafe(self._fail, failed, RequestFailedError(f"engine step failed: {e}"))
            if unhealthy:
                self.error = RuntimeError(f"{self.step_failures} engine steps failed in a row; last: "
                                          f"{type(e).__name__}: {e}")
                logger.error("the engine is unhealthy: %s", self.error)
            return
        self.step_failures = 0
        for out in outputs:  # the engine keeps appending to these lists: hand over copies
            for c in out.outputs:
                if c.logprobs is not None:
                    c.logprobs = list(c.logprobs)
        self._stats = self._read_stats()
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _read_stats(self) -> dict[str, float]:
        return {**self.engine.stats, "prompt_tokens": self.engine.num_prompt_tokens,
                "generation_tokens": self.engine.num_generated_tokens}


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
