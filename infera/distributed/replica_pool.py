"""The front of several engine replicas (Ray actors): the server's engine when ``--data-parallel-size`` > 1.

:class:`ReplicaPool` has the interface of :class:`AsyncLLMEngine` that the server uses.  It holds the
tokenizer only (no weights): a prompt's token ids give its block hashes, the :class:`Router` picks
a replica from them, and the ids go to that replica.  One task per request polls the replica for
outputs (:meth:`EngineReplica.poll`) and hands them to the request's stream.

Failover: a replica whose actor dies fails every call in flight with ``RayActorError``; one that
stops answering health pings, or whose engine thread stopped, is killed so that Ray restarts it.
Either way the router marks it down, and each of its requests is sent again to another replica.
A request whose outputs had already reached its stream continues only if the new run makes the
same tokens (greedy or seeded sampling): the stream then goes on where it was; else it ends with a
500.  The restarted actor (``max_restarts``) is marked up at its first healthy ping.

Disaggregated prefill and decode (``--prefill-replicas P --decode-replicas D``): a generation
request's prompt goes first to a prefill replica (chosen by ``routing_policy`` among the prefill
replicas: by cached prefix with cache_aware), which computes the KV of its full blocks but the
last token's; the request goes at once to a decode replica (the least loaded), which fetches that KV
from the prefill replica when it is ready (see :mod:`infera.distributed.replica`) and does the rest.
Embedding requests, prompts shorter than a block and prompt_logprobs requests go to the decode
replica alone.  A prefill replica that fails costs its requests only the recomputation there.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from infera.config import EngineConfig, ParallelConfig
from infera.distributed.replica import EngineReplica, ReplicaError
from infera.engine.async_engine import EngineDeadError, RequestFailedError, RequestStream
from infera.engine.llm_engine import check_prompt_length
from infera.loader.generation_config import sampling_defaults
from infera.loader.model_loader import open_model
from infera.loader.tokenizer import Tokenizer
from infera.outputs import RequestOutput
from infera.pooling_params import PoolingParams
from infera.router import RouteRequest, Router, block_hashes
from infera.sampling_params import SamplingParams
from infera.scaling.controller import SearchJob

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0  # between health pings of each replica
HEALTH_TIMEOUT_S = 30.0  # a replica that answers no ping for this long is killed (and restarted)
MAX_RESTARTS = 16  # restarts of one replica's actor before it stays down
MEAN_STATS = ("kv_cache_usage", "spec_acceptance_rate", "spec_mean_acceptance_length")  # averaged, not summed


@dataclass(eq=False)
class _Group:
    """Replicas of one role, their router and their stats as of their last pings."""

    role: str  # "engine" (colocated), "decode" or "prefill"
    actors: list[Any]
    router: Router
    stats: list[dict[str, float]]


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams | PoolingParams
    route: RouteRequest
    stream: RequestStream
    replica: int = -1  # where it was last sent
    delivered: RequestOutput | None = None  # the last output handed to the stream
    replaying: bool = False  # sent again after its replica failed, and not caught up with `delivered` yet
    pump: asyncio.Task | None = None
    prefill: asyncio.Task | None = None  # waits for its prefill replica (disaggregated)


class ReplicaPool:
    """``parallel.data_parallel_size`` replicas of the engine of ``config``, each an
    :class:`EngineReplica` actor with ``parallel.threads_per_replica`` threads.  Starts a local Ray
    cluster unless Ray is initialized or ``parallel.ray_address`` names one.  Blocks until every
    replica has loaded the model."""

    in_process = False  # scaling jobs run on a replica (their rewards must cross to it: built-in ones)

    def __init__(self, config: EngineConfig, parallel: ParallelConfig, max_waiting_requests: int | None = None,
                 log_to_driver: bool = True):
        threads = parallel.threads_per_replica
        sizes = ({"decode": parallel.decode_replicas, "prefill": parallel.prefill_replicas} if parallel.disaggregated
                 else {"engine": parallel.data_parallel_size})
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            local = parallel.ray_address is None
            ray.init(address=parallel.ray_address, num_cpus=sum(sizes.values()) * threads if local else None,
                     include_dashboard=False, log_to_driver=log_to_driver)
        source = open_model(config.model)
        self.config = config
        self.tokenizer = Tokenizer(source.tokenizer_dir(), source.config())
        self.default_sampling_params = sampling_defaults(config.generation_config, source)
        # Ray starts each actor with OMP_NUM_THREADS = its num_cpus, in this process's working directory
        actor = ray.remote(EngineReplica).options(num_cpus=threads, max_restarts=MAX_RESTARTS, max_task_retries=0)
        actors = {role: [actor.remote(config, threads, max_waiting_requests) for _ in range(n)]
                  for role, n in sizes.items()}
        infos = {role: ray.get([a.info.remote() for a in group]) for role, group in actors.items()}
        self.info: list[dict[str, Any]] = [i for group in infos.values() for i in group]
        self.max_model_len: int = min(i["max_model_len"] for i in self.info)
        self.groups = {role: _Group(role, actors[role], Router(
            len(actors[role]), "least_loaded" if role == "decode" else parallel.routing_policy,
            cache_threshold=parallel.routing_cache_threshold, prefill_weight=parallel.routing_prefill_weight,
            block_capacity=min(i["prefix_cache_tokens"] for i in infos[role]) // config.block_size),
            [{} for _ in actors[role]]) for role in sizes}
        self.serving = self.groups.get("engine") or self.groups["decode"]  # the replicas that stream outputs
        self.replicas, self.router = self.serving.actors, self.serving.router
        self.prefill = self.groups.get("prefill")
        self.kv_transfers = {"kv_transfer_requests": 0, "kv_transfer_blocks": 0, "kv_transfer_bytes": 0}
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._requests: dict[str, _Request] = {}  # likewise: those sent to a replica and not ended yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task | None = None
        self.draining = False
        self._job_ids = itertools.count()

    # -- what the server uses of AsyncLLMEngine --------------------------------------------------------
    def start(self) -> None:
        """Start the health pings; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._monitor = self._loop.create_task(self._ping_forever())

    async def warm_up(self) -> None:
        """Nothing to do: each replica warmed up as it loaded."""

    def shutdown(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for group in self.groups.values():
            for replica in group.actors:
                ray.kill(replica, no_restart=True)
        if self._owns_ray:
            ray.shutdown()

    @property
    def is_running(self) -> bool:
        return self._loop is not None and any(self.router.up)

    @property
    def error(self) -> str | None:
        return None if any(self.router.up) else "no engine replica is up"

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def replica_stats(self) -> list[dict[str, float]]:
        """Each replica's stats as of its last ping (decode replicas, then prefill replicas)."""
        return [stats for group in self.groups.values() for stats in group.stats]

    @property
    def stats(self) -> dict[str, float]:
        """The replicas' stats summed (:data:`MEAN_STATS` averaged), as of their last pings, and the
        KV moved from prefill to decode replicas."""
        total: dict[str, float] = dict(self.kv_transfers) if self.prefill else {}
        replica_stats = self.replica_stats
        for stats in replica_stats:
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        for key in MEAN_STATS:
            if key in total:
                total[key] /= len(replica_stats)
        return total

    def check_prompt_length(self, num_tokens: int, generates: bool = True) -> None:
        check_prompt_length(num_tokens, self.max_model_len, generates)

    async def add_request(self, prompt: str | list[int], params: SamplingParams | PoolingParams,
                          request_id: str) -> RequestStream:
        """Route a request to a replica and stream its outputs.  Raises as
        :meth:`AsyncLLMEngine.add_request` does (EngineDeadError also when no replica is up)."""
        self._check_accepting()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stream = RequestStream(request_id, self)
        req = _Request(request_id, ids, params, RouteRequest(request_id, block_hashes(ids, self.config.block_size)),
                       stream)
        self._streams[request_id] = stream
        self._requests[request_id] = req
        try:
            await self._send(req)
        except BaseException:
            stream.close()  # aborts it where it may have landed
            raise
        req.pump = asyncio.create_task(self._pump(req))
        return stream

    def _check_accepting(self) -> None:
        if self.draining:
            raise EngineDeadError("the server is shutting down; retry on another replica or after the restart")
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'not started'})")

    async def run_job(self, job: SearchJob) -> None:
        """Run a scaling search on one replica (the router's choice; all its branches stay there) and
        set its ``outcome``; cancelling the caller cancels it there.  A replica that dies under it
        fails it (RequestFailedError)."""
        self._check_accepting()
        job_id = f"job-{next(self._job_ids)}"
        try:
            replica = self.router.route(RouteRequest(job_id))
        except RuntimeError as e:
            raise EngineDeadError(str(e)) from None
        ref = self.replicas[replica].run_job.remote(job.build)
        try:
            got = await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except RayActorError as e:
            self._down(replica, e)
            raise RequestFailedError(f"engine replica {replica} failed during the search: {e}") from None
        finally:
            self.router.finish(job_id)
        if isinstance(got, ReplicaError):
            raise got.exception()
        job.outcome = got

    def replica_of(self, request_id: str) -> int | None:
        """The replica running a request, or None if it is not running."""
        req = self._requests.get(request_id)
        return None if req is None or req.replica < 0 else req.replica

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, reentrant: callable from ``__del__``)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._abort, request_id)

    def fail(self, request_ids: list[str], error: BaseException) -> None:
        """End these requests now with ``error`` (their streams raise it) and abort them (event loop only)."""
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(error)
            self._abort(request_id)

    def fail_all(self, error: BaseException) -> None:
        self.fail(list(self._streams), error)

    # -- requests on replicas ------------------------------------------------------------------------------
    async def _send(self, req: _Request, exclude: tuple[int, ...] = ()) -> None:
        """Send ``req`` to the replica the router picks, skipping those that fail as it is sent."""
        excluded = set(exclude)
        kv: tuple[ray.ObjectRef, ...] | None = None  # the prompt's KV from a prefill replica, started once
        while True:
            try:
                replica = self.router.route(req.route, excluded)
            except RuntimeError as e:  # none is up
                raise EngineDeadError(str(e)) from None
            req.replica = replica
            if kv is None:
                kv = self._prefill(req)
            try:
                error = await self.replicas[replica].add_request.remote(req.request_id, req.prompt, req.params, kv)
            except RayActorError as e:
                self._down(replica, e)
                excluded.add(replica)
                continue
            if error is not None:  # refused: nothing to abort there
                req.replica = -1
                self.router.finish(req.request_id)
                if error.kind == "busy" and len(excluded) + 1 < len(self.replicas):
                    excluded.add(replica)  # its queue is full: another's may not be
                    continue
                raise error.exception()
            return

    def _prefill(self, req: _Request) -> tuple[ray.ObjectRef, ...]:
        """Start the prefill of ``req``'s prompt on a prefill replica (disaggregated); returns the
        reference to its KV for the decode replica, or () where the decode replica computes it all."""
        bs = self.config.block_size
        n = (len(req.prompt) - 1) // bs * bs  # the blocks a request for the prompt takes from the cache
        if (self.prefill is None or n == 0 or not isinstance(req.params, SamplingParams)
                or req.params.prompt_logprobs is not None):
            return ()
        if req.prefill is not None:
            req.prefill.cancel()
        prefill_id = f"{req.request_id}-prefill"
        try:
            replica = self.prefill.router.route(RouteRequest(prefill_id, req.route.block_hashes[:n // bs]))
        except RuntimeError:  # no prefill replica is up: the decode replica computes the prompt
            return ()
        sizes, transfer = self.prefill.actors[replica].prefill.options(num_returns=2).remote(prefill_id,
                                                                                             req.prompt[:n])
        req.prefill = asyncio.create_task(self._prefilled(replica, prefill_id, sizes))
        return (transfer,)

    async def _prefilled(self, replica: int, prefill_id: str, sizes: ray.ObjectRef) -> None:
        """Wait for a prefill: count what it moves, mark its replica down if it died, cancel it when
        its request is aborted."""
        try:
            got = await sizes
        except asyncio.CancelledError:
            ray.cancel(sizes)
            raise
        except RayActorError as e:
            self._down(replica, e, self.prefill)
        else:
            if isinstance(got, ReplicaError):
                logger.warning("prefill of %s failed on prefill replica %d: %s", prefill_id, replica, got.message)
            else:
                self.kv_transfers["kv_transfer_requests"] += 1
                self.kv_transfers["kv_transfer_blocks"] += got["blocks"]
                self.kv_transfers["kv_transfer_bytes"] += got["bytes"]
        finally:
            self.prefill.router.finish(prefill_id)

    async def _pump(self, req: _Request) -> None:
        """Hand the replica's outputs to the stream until the request ends; send it again when its
        replica fails."""
        try:
            while True:
                replica = req.replica
                try:
                    out, error = await self.replicas[replica].poll.remote(req.request_id)
                except RayActorError as e:
                    self._down(replica, e)
                    out, error = None, ReplicaError("lost", str(e))
                if error is not None and error.kind == "lost":  # its replica failed (and may be back, empty)
                    self.router.finish(req.request_id)
                    req.replaying = req.delivered is not None
                    await self._send(req, exclude=(replica,))
                    continue
                if error is not None:
                    raise error.exception()
                if out is None:
                    continue
                self.router.prefill_done(req.request_id)  # an output came: its prompt is in (a no-op after once)
                if req.replaying:
                    caught_up = _caught_up(out, req.delivered)
                    if caught_up is None:
                        raise RequestFailedError(
                            f"an engine replica failed while this request was generating, and its new run (on replica "
                            f"{replica}) made other tokens (sampled without a seed, or a near tie); retry the request")
                    if not caught_up:
                        continue
                    req.replaying = False
                req.delivered = out
                req.stream.queue.put_nowait(out)
                if out.finished:
                    return
        except Exception as e:  # noqa: BLE001 - the stream raises it
            req.stream.queue.put_nowait(e)
        finally:
            self.router.finish(req.request_id)
            if self._requests.get(req.request_id) is req:
                del self._requests[req.request_id]

    def _abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for task in (req.pump, req.prefill):
            if task is not None:
                task.cancel()
        self.router.finish(request_id)
        if req.replica >= 0:
            self.replicas[req.replica].abort.remote(request_id)

    # -- replica health ------------------------------------------------------------------------------
    def _down(self, replica: int, reason: object, group: _Group | None = None) -> None:
        group = group or self.serving
        if group.router.up[replica]:
            lost = group.router.mark_down(replica)
            logger.warning("%s replica %d is down (%s); its %d requests go to other replicas", group.role, replica,
                           str(reason).splitlines()[0] if str(reason) else type(reason).__name__, len(lost))

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._ping(group, r) for group in self.groups.values()
                                   for r in range(len(group.actors))))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _ping(self, group: _Group, replica: int) -> None:
        """Record the replica's stats and mark it up; a dead one down (Ray restarts it); a hung one
        (no answer, or its engine thread stopped) down and killed, to be restarted."""
        try:
            stats = await asyncio.wait_for(group.actors[replica].health.remote(), HEALTH_TIMEOUT_S)
        except RayActorError as e:
            self._down(replica, e, group)
            return
        except Exception:  # noqa: BLE001 - no answer in time, or the ping failed there
            stats = None
        if stats is None:
            if group.router.up[replica]:
                self._down(replica, "no answer to the health ping, or its engine stopped", group)
                ray.kill(group.actors[replica], no_restart=False)
            return
        group.stats[replica] = stats
        if not group.router.up[replica]:
            group.router.mark_up(replica)
            logger.info("%s replica %d is up again", group.role, replica)


def _caught_up(out: RequestOutput, delivered: RequestOutput) -> bool | None:
    """Whether a request's new run (``out``) has made at least the tokens of ``delivered`` (an
    output of its run on a failed replica): True, False (not yet) or None (it made others)."""
    before = {c.index: list(c.token_ids) for c in delivered.outputs}
    caught_up = True
    for c in out.outputs:
        old, new = before.get(c.index, []), list(c.token_ids)
        n = min(len(old), len(new))
        if new[:n] != old[:n]:
            return None
        caught_up &= len(new) >= len(old)
    return caught_up if caught_up or not out.finished else None
