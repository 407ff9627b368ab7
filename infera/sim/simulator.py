"""Replay a trace through replicas of the real Scheduler and BlockManager on one simulated clock.

Each replica runs the engine's step without a model: the Scheduler picks the batch (chunked
prefill, decodes, preemption), the cost model says how long the step takes, and when it ends the
block manager commits the batch's tokens; a sequence that reached its end samples a token (a
synthetic one, unique to its request so that generated blocks are never shared) and finishes at
its trace's output length.  Replicas step independently: a heap holds each busy replica's step end,
and arrivals (routed by the :class:`Router` when they arrive) wake idle replicas.

Disaggregated prefill and decode (``prefill_replicas`` > 0, as ``infera serve --prefill-replicas``):
the last ``prefill_replicas`` replicas compute prompts (their full blocks but the last token's,
routed by ``policy``), the others decode (routed least-loaded).  When a prompt's prefill ends, its
KV takes ``kv_transfer_s_per_token`` seconds per token to reach the decode replica, which receives
its blocks as cached prefix blocks, computes the rest of the prompt and samples the first token.

KV offloading (``host_kv_tokens`` > 0, as ``--kv-offloading-size``): each replica's prefix cache has
a host tier of that many tokens; a step that loads blocks from it takes ``kv_load_s_per_token``
seconds per loaded token more (the copies to the host run beside the steps, as on a copy stream).
"""
from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from tqdm import tqdm

from infera.engine.block_manager import BlockManager
from infera.engine.scheduler import ScheduledBatch, Scheduler
from infera.engine.sequence import Sequence
from infera.router import RouteRequest, Router
from infera.sampling_params import SamplingParams
from infera.sim.cost_model import CostModel, ReplicaLimits, batch_features
from infera.sim.trace import TRACE_BLOCK, TraceRequest

PARAMS = SamplingParams()  # the scheduler reads no sampling option the simulator sets


@dataclass
class RequestRecord:
    """One trace request's fate, times in simulated seconds."""

    arrival: float
    input_length: int
    output_length: int
    replica: int = -1  # -1: rejected (does not fit a replica's KV cache)
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    first_token: float | None = None
    last_token: float = 0.0
    finish: float | None = None
    generated: int = 0
    itl_sum: float = 0.0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def mean_itl(self) -> float:
        return self.itl_sum / (self.generated - 1) if self.generated > 1 else 0.0


class Replica:
    """One engine's scheduler and block manager, and the step in flight."""

    def __init__(self, limits: ReplicaLimits, host_kv_tokens: int = 0):
        num_blocks = limits.num_kv_tokens // limits.block_size
        self.block_manager = BlockManager(num_blocks, limits.block_size, num_host_blocks=host_kv_tokens //
                                          limits.block_size)
        self.scheduler = Scheduler(self.block_manager, limits.max_num_seqs, limits.max_num_batched_tokens)
        self.batch: ScheduledBatch | None = None
        self.woken = False  # a step start is on the clock
        self.busy_time = 0.0
        self.num_steps = 0
        self.num_requests = 0
        self.output_tokens = 0


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    itls: array  # every inter-token latency, seconds
    replicas: list[Replica]
    router: Router  # the one routing by cached prefix (the prefill replicas' when disaggregated)
    wall_s: float  # real seconds the simulation took


class Simulator:
    def __init__(self, requests: Seq[TraceRequest], num_replicas: int, policy: str, cost_model: CostModel,
                 *, limits: ReplicaLimits | None = None, router_capacity: int | None = None,
                 balance_abs_threshold: int | None = None, cache_threshold: float | None = None,
                 prefill_weight: float | None = None, seed: int = 0, prefill_replicas: int = 0,
                 kv_transfer_s_per_token: float = 0.0, host_kv_tokens: int = 0, kv_load_s_per_token: float = 0.0,
                 progress: bool = True):
        """``limits``: each replica's engine (default: the one the cost model describes);
        ``router_capacity``: trace blocks each replica's router index keeps (default: its prefix cache,
        host tier included);
        ``balance_abs_threshold``, ``cache_threshold``, ``prefill_weight``: the router's (default: the Router's);
        ``prefill_replicas`` of the ``num_replicas`` only prefill (disaggregated; 0: colocated)."""
        limits = limits or cost_model.replica
        if TRACE_BLOCK % limits.block_size:
            raise ValueError(f"the block size ({limits.block_size}) must divide the trace's {TRACE_BLOCK}-token blocks")
        if not 0 <= prefill_replicas < num_replicas:
            raise ValueError(f"prefill replicas must leave at least one decode replica: {prefill_replicas} of "
                             f"{num_replicas}")
        self.requests = sorted(requests, key=lambda r: r.arrival)
        self.policy = policy
        self.cost_model = cost_model
        self.replicas = [Replica(limits, host_kv_tokens) for _ in range(num_replicas)]  # decode, then prefill
        self.num_decode = num_replicas - prefill_replicas
        self.kv_transfer_s_per_token = kv_transfer_s_per_token
        self.kv_load_s_per_token = kv_load_s_per_token
        self.max_tokens = self.replicas[0].block_manager.num_blocks * limits.block_size
        capacity = router_capacity or max(1, (self.max_tokens + host_kv_tokens) // TRACE_BLOCK)
        options = {k: v for k, v in (("balance_abs_threshold", balance_abs_threshold),
                                     ("cache_threshold", cache_threshold), ("prefill_weight", prefill_weight))
                   if v is not None}
        self.router = Router(self.num_decode, "least_loaded" if prefill_replicas else policy, block_capacity=capacity,
                             seed=seed, **options)
        self.prefill_router = (Router(prefill_replicas, policy, block_capacity=capacity, seed=seed, **options)
                               if prefill_replicas else None)
        self.records = [RequestRecord(r.arrival, r.input_length, r.output_length) for r in self.requests]
        self.itls = array("d")
        self.progress = progress
        self._bar: tqdm | None = None  # over requests: finished or rejected
        self._clock: list[tuple[float, int, int]] = []  # (time, tie-break, replica) of step boundaries
        self._ticks = 0
        self._live: dict[int, tuple[int, RequestRecord]] = {}  # seq_id -> (request index, record)
        self._prefilling: set[int] = set()  # seq_ids of prompts on prefill replicas

    def run(self) -> SimResult:
        started = time.perf_counter()
        self._bar = tqdm(total=len(self.requests), desc=f"simulating {self.policy}", unit="req",
                         disable=not self.progress)
        clock, requests = self._clock, self.requests
        i = 0
        while i < len(requests) or clock:
            # arrivals first at equal times: a step starting then sees every request that has arrived
            if i < len(requests) and (not clock or requests[i].arrival <= clock[0][0]):
                self._arrive(i)
                i += 1
            else:
                now, _, r = heapq.heappop(clock)
                if r < 0:  # a prompt's KV reached the decode side
                    self._admit(-1 - r, now)
                else:
                    self._step(self.replicas[r], r, now)
        self._bar.close()
        return SimResult(self.policy, self.records, self.itls, self.replicas, self.prefill_router or self.router,
                         time.perf_counter() - started)

    def _wake(self, r: int, now: float) -> None:
        """Put replica ``r``'s next step start (or, for r = -1 - i, request i's KV arrival) on the clock."""
        heapq.heappush(self._clock, (now, self._ticks, r))
        self._ticks += 1

    def _arrive(self, i: int) -> None:
        req, rec = self.requests[i], self.records[i]
        if req.input_length + req.output_length > self.max_tokens:
            self._bar.update()
            return
        bs = self.replicas[0].block_manager.block_size
        prefix = (req.input_length - 1) // bs * bs  # what a prefill replica computes and sends
        if self.prefill_router is None or prefix == 0:
            self._admit(i, req.arrival)
            return
        p = self.prefill_router.route(RouteRequest(f"prefill-{i}", req.route_hashes()))
        seq = Sequence(req.prompt_tokens()[:prefix], PARAMS, str(i))
        self._prefilling.add(seq.seq_id)
        self._add(self.num_decode + p, seq, i, req.arrival)

    def _admit(self, i: int, now: float) -> None:
        """Route request ``i`` to a (decode) replica, its prompt's KV received there if it was prefilled."""
        req, rec = self.requests[i], self.records[i]
        r = self.router.route(RouteRequest(str(i), req.route_hashes()))
        rec.replica = r
        seq = Sequence(req.prompt_tokens(), PARAMS, str(i))
        if self.prefill_router is not None:
            self.replicas[r].block_manager.add_cached_blocks(seq.token_ids[:seq.num_tokens - 1])
        self._add(r, seq, i, now)

    def _add(self, r: int, seq: Sequence, i: int, now: float) -> None:
        replica = self.replicas[r]
        replica.num_requests += 1
        self._live[seq.seq_id] = (i, self.records[i])
        replica.scheduler.add(seq)
        if replica.batch is None and not replica.woken:
            replica.woken = True
            self._wake(r, now)

    def _step(self, replica: Replica, r: int, now: float) -> None:
        """End the step in flight on ``replica`` (if any) at ``now`` and start its next one."""
        if replica.batch is not None:
            self._finish_step(replica, now)
        replica.woken = False
        batch = replica.scheduler.schedule()
        if not batch:
            replica.batch = None
            if replica.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: KV cache too small for any waiting sequence")
            return
        seconds = self.cost_model.step_time(batch_features(batch))
        if loads := sum(1 for src, _ in batch.block_copies if src < 0):  # blocks of prefix hits on the host
            seconds += loads * replica.block_manager.block_size * self.kv_load_s_per_token
        replica.batch = batch
        replica.busy_time += seconds
        replica.num_steps += 1
        self._wake(r, now + seconds)

    def _finish_step(self, replica: Replica, now: float) -> None:
        commit = replica.block_manager.commit
        for seq, n in zip(replica.batch.seqs, replica.batch.num_new_tokens):
            commit(seq, n)
            i, rec = self._live[seq.seq_id]
            if rec.cached_tokens is None:
                rec.cached_tokens = seq.num_cached_tokens
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk: no token sampled
            if seq.seq_id in self._prefilling:  # its KV goes to a decode replica
                self._prefilling.discard(seq.seq_id)
                replica.scheduler.finish(seq)
                self.prefill_router.finish(f"prefill-{i}")
                del self._live[seq.seq_id]
                self._wake(-1 - i, now + seq.num_tokens * self.kv_transfer_s_per_token)
                continue
            if rec.first_token is None:
                rec.first_token = now
                self.router.prefill_done(str(i))
            else:
                self.itls.append(now - rec.last_token)
                rec.itl_sum += now - rec.last_token
            rec.last_token = now
            rec.generated += 1
            replica.output_tokens += 1
            if rec.generated < rec.output_length:
                seq.append_token(-1 - i)
                continue
            rec.finish = now
            replica.scheduler.finish(seq)
            self.router.finish(str(i))
            del self._live[seq.seq_id]
            self._bar.update()
