"""The router: which replica serves a request.

Policies (``--routing-policy``):
- ``round_robin``: replicas in turn;
- ``least_loaded``: the less loaded of two replicas drawn at random (power of two choices) by
  outstanding requests;
- ``cache_aware``: the replica of least estimated cost, ``prefill_weight`` times the prompt blocks
  its :class:`PrefixIndex` does not hold (the prefill the request would add there) plus its load:
  the blocks routed there still waiting for their prefill and one per outstanding request (ties: the
  longest match, then the smallest index).  This is the load-aware placement of NVIDIA Dynamo's KV
  router (overlap weight times prefill blocks plus active blocks) and llm-d's prefix and load
  scorers; the weight trades cache hits (less work for the cluster) against queueing (this
  request's wait);
- ``longest_prefix``: SGLang router's cache-aware rule: the replica whose index holds the longest
  prefix of the request, if that prefix is at least ``cache_threshold`` of the prompt's blocks and
  its load does not exceed the least loaded replica's by more than ``balance_abs_threshold`` and
  ``balance_rel_threshold`` times (SGLang's balance rule, applied to that replica); otherwise the
  least loaded (of equally loaded ones, the one caching least).

The cache threshold is SGLang router's ``--cache-threshold`` (sgl-router ``policies/cache_aware.rs``:
the matched share of the prompt must exceed it; 0.3 on its command line, 0.5 in its library
default) and Ray Serve's ``PrefixCacheAffinityRouter`` ``match_rate_threshold`` (at least 0.1); here
the share is of the prompt's blocks and must reach it, and a prompt that matches nowhere never
counts as a match, so 0 routes every match to its replica.  SGLang checks balance globally (the
busiest against the least loaded replica, whatever the request matches); this router checks the
chosen replica only, so one busy replica does not turn every request's affinity off.

The load in blocks is what the router itself routed: a request's unmatched blocks count on its
replica until :meth:`Router.prefill_done` (its first token) or :meth:`Router.finish`.

A request may carry an ``affinity`` key (the branches of one scaling problem, a conversation): while
a request with that key is outstanding, the others follow it to its replica.  Replicas marked down
receive nothing and lose their index (a restarted actor starts with an empty cache).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from infera.router.prefix_index import PrefixIndex

POLICIES = ("round_robin", "least_loaded", "cache_aware", "longest_prefix")
# both measured on the Mooncake trace's first 3,000 requests (README, Cluster simulator)
DEFAULT_CACHE_THRESHOLD = 0.1
DEFAULT_PREFILL_WEIGHT = 8.0


@dataclass
class RouteRequest:
    request_id: str
    block_hashes: Sequence[int] = ()  # chain hashes of the prompt's full blocks
    affinity: str | None = None


class Router:
    def __init__(self, num_replicas: int, policy: str = "cache_aware", *, block_capacity: int | None = None,
                 balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.5,
                 cache_threshold: float = DEFAULT_CACHE_THRESHOLD, prefill_weight: float = DEFAULT_PREFILL_WEIGHT,
                 seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if num_replicas < 1:
            raise ValueError(f"need at least one replica, got {num_replicas}")
        if not 0 <= cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if prefill_weight < 0:
            raise ValueError(f"prefill_weight must be >= 0, got {prefill_weight}")
        self.policy = policy
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.cache_threshold = cache_threshold
        self.prefill_weight = prefill_weight
        self.indexes = [PrefixIndex(block_capacity) for _ in range(num_replicas)]
        self.loads = [0] * num_replicas
        self.prefill_blocks = [0] * num_replicas  # unmatched blocks routed there and not yet prefilled
        self._prefill: dict[str, int] = {}  # outstanding request -> its unmatched blocks, until prefilled
        self.up = [True] * num_replicas
        self._rng = random.Random(seed)
        self._next = 0
        self._where: dict[str, tuple[int, str | None]] = {}  # outstanding request -> (replica, affinity)
        self._affinity: dict[str, tuple[int, int]] = {}  # key -> (replica, outstanding requests)
        self.blocks_routed = 0  # prompt blocks routed, and of them found in the chosen replica's index
        self.blocks_matched = 0

    @property
    def num_replicas(self) -> int:
        return len(self.loads)

    def route(self, request: RouteRequest, exclude: Iterable[int] = ()) -> int:
        """Choose a replica for ``request`` (none of ``exclude``) and count it there until
        :meth:`finish`.  Raises RuntimeError when no replica is up."""
        excluded = set(exclude)
        live = [r for r in range(self.num_replicas) if self.up[r] and r not in excluded]
        if not live:
            raise RuntimeError("no engine replica is available")
        key = request.affinity
        pinned = self._affinity.get(key) if key is not None else None
        if pinned is not None and pinned[0] in live:
            replica = pinned[0]
        else:
            replica = self._choose(request, live)
        hashes = request.block_hashes
        matched = self.indexes[replica].match(hashes)
        self.blocks_routed += len(hashes)
        self.blocks_matched += matched
        self.prefill_blocks[replica] += len(hashes) - matched
        self._prefill[request.request_id] = len(hashes) - matched
        self.indexes[replica].insert(hashes)
        self.loads[replica] += 1
        self._where[request.request_id] = (replica, key)
        if key is not None:
            held = self._affinity.get(key)
            self._affinity[key] = (replica, (held[1] if held and held[0] == replica else 0) + 1)
        return replica

    def _choose(self, request: RouteRequest, live: list[int]) -> int:
        if self.policy == "round_robin":
            while self._next % self.num_replicas not in live:
                self._next += 1
            replica = self._next % self.num_replicas
            self._next += 1
            return replica
        if self.policy == "least_loaded":
            if len(live) == 1:
                return live[0]
            a, b = self._rng.sample(live, 2)
            return a if self.loads[a] <= self.loads[b] else b
        hashes = request.block_hashes
        matches = {r: self.indexes[r].match(hashes) for r in live}
        if self.policy == "cache_aware":
            return min(live, key=lambda r: (self.cost(r, len(hashes) - matches[r]), -matches[r], len(self.indexes[r])))
        # the least loaded; among equals, the one caching least (SGLang's smallest tree): new prefixes spread
        least = min(live, key=lambda r: (self.loads[r], len(self.indexes[r])))
        best = max(live, key=lambda r: (matches[r], -self.loads[r]))
        if (matches[best] == 0 or matches[best] / len(hashes) < self.cache_threshold
                or self._imbalanced(self.loads[best], self.loads[least])):
            return least
        return best

    def cost(self, replica: int, new_blocks: int) -> float:
        """cache_aware's estimate, in blocks, of sending ``replica`` a request with ``new_blocks`` blocks
        it does not cache: their prefill, weighted, plus the prefill queued there and one block per
        outstanding request."""
        return self.prefill_weight * new_blocks + self.prefill_blocks[replica] + self.loads[replica]

    def _imbalanced(self, load: int, least: int) -> bool:
        return load - least > self.balance_abs_threshold and load > least * self.balance_rel_threshold

    def finish(self, request_id: str) -> None:
        """``request_id`` left its replica (finished, aborted or failed); unknown ids are ignored."""
        where = self._where.pop(request_id, None)
        if where is None:
            return
        replica, key = where
        self.loads[replica] -= 1
        self.prefill_blocks[replica] -= self._prefill.pop(request_id, 0)
        if key is not None and key in self._affinity:
            held_replica, count = self._affinity[key]
            if held_replica == replica:
                if count <= 1:
                    del self._affinity[key]
                else:
                    self._affinity[key] = (replica, count - 1)

    def prefill_done(self, request_id: str) -> None:
        """``request_id``'s prompt is prefilled (its first token came): its blocks leave its replica's queue."""
        where = self._where.get(request_id)
        if where is not None:
            self.prefill_blocks[where[0]] -= self._prefill.pop(request_id, 0)

    def mark_down(self, replica: int) -> list[str]:
        """Take ``replica`` out of routing; returns the ids of the requests it held (forgotten
        here: the caller re-routes or fails them)."""
        self.up[replica] = False
        self.indexes[replica].clear()
        lost = [rid for rid, (r, _) in self._where.items() if r == replica]
        for rid in lost:
            self.finish(rid)
        return lost

    def mark_up(self, replica: int) -> None:
        self.up[replica] = True

    @property
    def hit_rate(self) -> float:
        """Prompt blocks found in the chosen replica's index, over all routed."""
        return self.blocks_matched / self.blocks_routed if self.blocks_routed else 0.0
