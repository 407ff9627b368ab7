"""KV offloading: a second tier of the prefix cache in host memory (vLLM's ``--kv-offloading-size``,
SGLang's hierarchical cache, Mooncake's DRAM pool).

A cached block the device cache evicts (to reuse its slots) is first copied to a host block, if
the host tier does not hold it already; a prompt whose prefix continues in the host tier gets new
device blocks and their KV copied back instead of recomputed.  :class:`HostBlockPool` is the host
tier's bookkeeping, pure Python over integer slot ids: which chain hash each host block holds, least
recently used evicted first.  The copies themselves are entries of the block manager's
``pending_copies``, a host block ``h`` written ``~h`` (negative), executed by the KV pool before the
next forward pass in the order they were recorded.
"""
from __future__ import annotations

from collections import OrderedDict


class HostBlockPool:
    """``num_blocks`` host KV blocks, each holding the block of one chain hash (or free)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
        self.lru: OrderedDict[int, int] = OrderedDict()  # chain hash -> host block, least recent first
        self.entries: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks  # (hash, token ids)

    @property
    def num_cached_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """The host block holding ``block_hash`` with these tokens (now most recently used), or None."""
        slot = self.lru.get(block_hash)
        if slot is None or self.entries[slot][1] != token_ids:
            return None
        self.lru.move_to_end(block_hash)
        return slot

    def store(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """A host block to copy the device block of ``block_hash`` into, evicting the least recently
        used if none is free; None when no copy is needed (already held) or possible (every host
        block is held for a load in progress)."""
        if block_hash in self.lru:
            self.lru.move_to_end(block_hash)
            return None
        if self.free:
            slot = self.free.pop()
        elif self.lru:
            _, slot = self.lru.popitem(last=False)
        else:
            return None
        self.entries[slot] = (block_hash, token_ids)
        self.lru[block_hash] = slot
        return slot

    def hold(self, slots: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        """Take these blocks out of eviction while their KV is loaded; returns their (hash, token ids)."""
        for slot in slots:
            del self.lru[self.entries[slot][0]]
        return [self.entries[slot] for slot in slots]

    def release(self, slots: list[int]) -> None:
        """Let held blocks be evicted again, as the most recently used."""
        for slot in slots:
            self.lru[self.entries[slot][0]] = slot

    def clear(self) -> None:
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self.lru.clear()
        self.entries = [None] * self.num_blocks
