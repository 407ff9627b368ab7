"""What one replica probably holds in its prefix cache, as the router sees it.

The router does not ask replicas what they cache (SGLang's cache-aware router doesn't either): it
records the prompt blocks it sent to each replica and forgets the least recently used beyond the
replica's KV capacity, as the replica's own LRU eviction would.  Blocks are identified by chain
hashes (each covers its whole prefix), so a prefix tree reduces to a set: a request's cached
prefix is its leading run of hashes found there.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chain hashes of the full blocks of ``token_ids``: the block manager's ``hash((previous,
    tokens))`` (deterministic across processes: ints and tuples are not salted)."""
    out: list[int] = []
    prev = 0
    for i in range(len(token_ids) // block_size):
        prev = hash((prev, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(prev)
    return out


class PrefixIndex:
    """Chain hashes routed to one replica, least recently used first; at most ``capacity`` kept
    (None: unbounded)."""

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1 block, got {capacity}")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` are held."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record ``hashes`` as just used, evicting the least recently used beyond capacity.  A
        prefix's first blocks end up the most recent (as in the engine, which frees a sequence's
        blocks tail first), so eviction shortens chains from their ends."""
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        if self.capacity is not None:
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
