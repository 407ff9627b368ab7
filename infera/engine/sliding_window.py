"""The block tables of a hybrid KV cache's sliding-window groups (vLLM's sliding-window manager).

A sliding layer's query at position p reads positions (p - window, p] only, so once a sequence has
computed ``c`` tokens no later query reads a position before ``c - window + 1``: the blocks that end
before it are released to the pool (:class:`~infera.engine.block_manager.BlockManager`'s, shared
with the full-attention group) as soon as the sequence next gets slots.  Each sliding group has its
own table per sequence (``seq.window_tables``, one block of that group's layers per entry; all have
the same shape), covering positions from ``seq.window_start`` on: leading entries are dropped in steps
of the native kernel's 128-position chunks, so that a query's arithmetic (its chunks, on a grid of
absolute positions) is the same as over a whole table.  Between ``window_start`` and the window the
first ``seq.window_freed`` entries are released already; they read as block 0, whose positions the
window masks.

Prefix caching works per group, as vLLM's: a sliding block is cached under the chain hash of the
full-attention block at its position once it is full, and stays findable after release until its
block is reused.  A prefix hit of k blocks needs the full group's first k blocks and, in every sliding
group, the blocks of the window a query at position k * block_size reads
(:meth:`SlidingWindowManager.longest_hit`).  The host tier of the prefix cache holds full-attention
blocks only, so a hybrid cache has none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infera.engine.sequence import Sequence

if TYPE_CHECKING:
    from infera.engine.block_manager import BlockManager

CHUNK = 128  # positions per work item of the native paged-attention kernel (csrc/paged_attention.cpp)


@dataclass
class WindowHit:
    """The sliding groups' part of a prefix hit of ``num_tokens`` tokens: tables from position ``start``
    whose first ``freed`` entries (block 0) precede the window."""

    num_tokens: int
    start: int
    freed: int
    tables: list[list[int]]


class SlidingWindowManager:
    """``num_groups`` sliding groups of ``window`` positions, their blocks from ``block_manager``'s pool."""

    def __init__(self, block_manager: BlockManager, num_groups: int, window: int):
        if num_groups < 1 or window < 1:
            raise ValueError(f"need at least one sliding group and a window, got {num_groups} x {window}")
        self.blocks = block_manager
        self.num_groups = num_groups
        self.window = window
        self.align = math.lcm(CHUNK, block_manager.block_size)  # window_start moves in steps of this
        self.hash_to_block: list[dict[int, int]] = [{} for _ in range(num_groups)]

    # -- prefix cache -------------------------------------------------------------------
    def _first_block(self, num_tokens: int) -> int:
        """The first block a query at position ``num_tokens`` reads."""
        return max(0, num_tokens - self.window + 1) // self.blocks.block_size

    def _cached(self, group: int, full_block: int) -> int | None:
        """Group ``group``'s cached block at the position of cached full-attention block ``full_block``."""
        full = self.blocks.blocks[full_block]
        block_id = self.hash_to_block[group].get(full.hash)
        return block_id if block_id is not None and self.blocks.blocks[block_id].token_ids == full.token_ids else None

    def longest_hit(self, full_blocks: list[int]) -> int:
        """How many of ``full_blocks`` (a cached prefix of the full group) make a prefix hit: the most
        whose window every sliding group holds."""
        k = len(full_blocks)
        while k:
            missing = next((i for i in range(k - 1, self._first_block(k * self.blocks.block_size) - 1, -1)
                            if any(self._cached(g, full_blocks[i]) is None for g in range(self.num_groups))), None)
            if missing is None:
                return k
            k = missing  # a hit past block `missing` would need it
        return 0

    def hit(self, full_blocks: list[int]) -> WindowHit:
        """The sliding tables of a prefix hit on ``full_blocks`` (:meth:`longest_hit` of them)."""
        num_tokens = len(full_blocks) * self.blocks.block_size
        first = self._first_block(num_tokens)
        start = first * self.blocks.block_size // self.align * self.align
        freed = first - start // self.blocks.block_size
        tables = [[0] * freed + [self._cached(g, b) for b in full_blocks[first:]] for g in range(self.num_groups)]
        return WindowHit(num_tokens, start, freed, tables)

    def cache_blocks(self, seq: Sequence, start_token: int) -> None:
        """Cache the sliding blocks that became full and computed since ``start_token`` (their full
        group's blocks are cached: their hashes)."""
        bs = self.blocks.block_size
        for i in range(max(start_token // bs, seq.window_start // bs + seq.window_freed), seq.num_computed_tokens // bs):
            full = self.blocks.blocks[seq.block_table[i]]
            for table, index in zip(seq.window_tables, self.hash_to_block):
                block = self.blocks.blocks[table[i - seq.window_start // bs]]
                if block.hash is None:
                    block.hash, block.token_ids = full.hash, full.token_ids
                    index.setdefault(full.hash, block.block_id)

    def unhash(self, block_id: int, block_hash: int) -> None:
        for index in self.hash_to_block:
            if index.get(block_hash) == block_id:
                del index[block_hash]

    def reset(self) -> None:
        for index in self.hash_to_block:
            index.clear()

    def max_blocks(self, max_new_tokens: int) -> int:
        """The most entries one group's table holds while a step adds up to ``max_new_tokens`` tokens."""
        return -(-(self.window + self.align + max_new_tokens) // self.blocks.block_size) + 1

    def release(self, seq: Sequence) -> None:
        """Release the blocks no later query of ``seq`` reads (those ending before its next query's window)."""
        if not seq.window_tables:
            return
        bs = self.blocks.block_size
        keep_from = max(0, seq.num_computed_tokens - self.window + 1)
        dead = (keep_from - seq.window_start) // bs  # entries ending at or before keep_from
        if dead > seq.window_freed:
            for table in seq.window_tables:
                self.blocks._release(table[seq.window_freed:dead])
                table[seq.window_freed:dead] = [0] * (dead - seq.window_freed)
            seq.window_freed = dead
        drop = (keep_from // self.align * self.align - seq.window_start) // bs
        if drop > 0:
            for table in seq.window_tables:
                del table[:drop]
            seq.window_start += drop * bs
            seq.window_freed -= drop

    def needed(self, seq: Sequence, num_new_tokens: int, hit: WindowHit | None = None) -> int:
        """Blocks of the pool :meth:`allocate` takes for ``num_new_tokens`` more tokens (after :meth:`release`;
        ``hit``: of a sequence that takes this prefix hit first)."""
        if hit is not None:
            revived = sum(self.blocks.blocks[b].ref_count == 0 for t in hit.tables for b in t[hit.freed:])
            end = hit.num_tokens + num_new_tokens - hit.start
            return revived + self.num_groups * max(0, self.blocks.blocks_for(end) - len(hit.tables[0]))
        held = len(seq.window_tables[0]) if seq.window_tables else 0
        end = seq.num_computed_tokens + num_new_tokens - seq.window_start
        return self.num_groups * (max(0, self.blocks.blocks_for(end) - held) + self._needs_cow(seq))

    def _needs_cow(self, seq: Sequence) -> bool:
        idx = (seq.num_computed_tokens - seq.window_start) // self.blocks.block_size
        return bool(seq.window_tables) and idx < len(seq.window_tables[0]) and \
            self.blocks.blocks[seq.window_tables[0][idx]].ref_count > 1

    def take_hit(self, seq: Sequence, hit: WindowHit) -> None:
        """``seq`` (holding no blocks) takes the sliding blocks of a prefix hit, before any new block is
        drawn from the pool (which could reuse them)."""
        for table in hit.tables:
            for block_id in table[hit.freed:]:
                self.blocks.take(block_id)
        seq.window_tables, seq.window_start, seq.window_freed = hit.tables, hit.start, hit.freed

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Slots for ``seq``'s next ``num_new_tokens`` tokens in every sliding group (the pool has room:
        :meth:`needed`); the block being written is copied first if another sequence shares it."""
        if not seq.window_tables:
            seq.window_tables = [[] for _ in range(self.num_groups)]
        if self._needs_cow(seq):
            idx = (seq.num_computed_tokens - seq.window_start) // self.blocks.block_size
            for table in seq.window_tables:
                src, table[idx] = table[idx], self.blocks._new_block()
                self.blocks.blocks[src].ref_count -= 1
                self.blocks.pending_copies.append((src, table[idx]))
        end = seq.num_computed_tokens + num_new_tokens - seq.window_start
        for table in seq.window_tables:
            table.extend(self.blocks._new_block() for _ in range(self.blocks.blocks_for(end) - len(table)))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for table in parent.window_tables:
            for block_id in table[parent.window_freed:]:
                self.blocks.blocks[block_id].ref_count += 1
        child.window_tables = [list(table) for table in parent.window_tables]
        child.window_start, child.window_freed = parent.window_start, parent.window_freed

    def free(self, seq: Sequence) -> None:
        for table in seq.window_tables:
            self.blocks._release(table[seq.window_freed:])
        seq.window_tables, seq.window_start, seq.window_freed = [], 0, 0

    def holds_window(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` still holds what a query at position ``num_tokens`` reads (truncating there
        keeps a usable cache)."""
        first_read = max(0, num_tokens - self.window + 1)
        return not seq.window_tables or first_read >= seq.window_start + seq.window_freed * self.blocks.block_size

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep slots for positions before ``num_tokens`` only (:meth:`holds_window` must hold)."""
        keep = self.blocks.blocks_for(max(0, num_tokens - seq.window_start))
        if not keep:
            self.free(seq)
            return
        for table in seq.window_tables:
            self.blocks._release(table[max(keep, seq.window_freed):])
            del table[keep:]
            if num_tokens % self.blocks.block_size and len(table) > seq.window_freed:
                self.blocks.unhash_unshared(table[-1])  # it will be written again
        seq.window_freed = min(seq.window_freed, keep)
