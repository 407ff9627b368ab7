"""Staging slots of a 2-bit KV cache (:mod:`infera.layers.kivi`): the keys and values of the blocks a
query reads in full precision.

A query reads exact keys and values in its residual zone: the first block (the attention sinks) and
its own block with the ``residual_blocks - 1`` blocks before it (KIVI's residual), wherever those
blocks hold a staging slot.  Blocks get slots when they are written: all of them in a short step
(decode, verification), else the first block and those of the zone the step ends in; a key block
is quantized from its slot once full.  A slot whose block leaves every zone (or is freed) is idle:
it keeps its rows, so a prefix hit or a rollback can use them, until a block being written needs a
slot and none is free (least recently idled first) or its block is written anew.

Outputs never depend on which slots survived: a prefix hit is cut back until the zone of its first
computed token is all staged, and so is a cut into a sequence (:meth:`KiviStaging.held`).  Pure
Python over block ids, at the block manager's named points; the model runner reads
:attr:`KiviStaging.slots` to build its tensors and copies a slot with its block on copy-on-write.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from infera.engine.sequence import Sequence

if TYPE_CHECKING:
    from infera.engine.block_manager import Block


class KiviStaging:
    def __init__(self, num_slots: int, block_size: int, residual_blocks: int, blocks: list[Block]):
        if num_slots < self.most_needed(residual_blocks):
            raise ValueError(f"a kivi2 KV cache needs at least {self.most_needed(residual_blocks)} staging slots, "
                             f"got {num_slots}")
        self.block_size = block_size
        self.residual_blocks = residual_blocks
        self.blocks = blocks
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.slots: dict[int, int] = {}  # block id -> staging slot
        self.idle: OrderedDict[int, None] = OrderedDict()  # staged blocks no query reads now, oldest first

    @staticmethod
    def most_needed(residual_blocks: int) -> int:
        """The slots one sequence may need at once: block 0, the zone before a long chunk's first token,
        that token's block and the zone the chunk ends in."""
        return 2 * residual_blocks + 1

    @property
    def num_available_slots(self) -> int:
        return len(self.free_slots) + len(self.idle)

    def zone(self, num_kv_tokens: int) -> list[int]:
        """Table indices of the blocks before table slot ``num_kv_tokens``'s block that a query there
        reads exactly: the first, and the ``residual_blocks - 1`` before its own."""
        own = num_kv_tokens // self.block_size
        return [0, *range(max(1, own - self.residual_blocks + 1), own)] if own else []

    def written(self, seq: Sequence, num_new_tokens: int, start: int | None = None) -> list[int]:
        """Indices into ``seq``'s table of the blocks its next ``num_new_tokens`` tokens (from table slot
        ``start``, by default its KV's end) write that get a staging slot."""
        bs = self.block_size
        start = seq.num_kv_tokens if start is None else start
        first, last = start // bs, (start + num_new_tokens - 1) // bs
        low = first if num_new_tokens <= bs else max(first, last - self.residual_blocks + 1)
        return [0] * (first == 0 < low) + list(range(low, last + 1))

    def needed(self, seq: Sequence, num_new_tokens: int, start: int, cow: bool) -> int:
        """Slots :meth:`assign` takes for ``seq``'s next ``num_new_tokens`` tokens from table slot
        ``start`` (past any prefix hits it is about to take; ``cow``: the block it writes first is
        split copy-on-write: a new block)."""
        table, first = seq.block_table, start // self.block_size
        return sum(1 for i in self.written(seq, num_new_tokens, start)
                   if i >= len(table) or table[i] not in self.slots or (cow and i == first))

    def fits(self, seq: Sequence, num_new_tokens: int, start: int, cow: bool, hits: list[int]) -> bool:
        """Whether the slots ``seq``'s next tokens need are free or idle (and not idle blocks of the zone
        its prefix hits ``hits`` bring back into use)."""
        reused = sum(1 for i in self.zone(start) if hits and hits[i] in self.idle)
        return self.needed(seq, num_new_tokens, start, cow) + reused <= self.num_available_slots

    def assign(self, seq: Sequence, num_new_tokens: int) -> None:
        for i in self.written(seq, num_new_tokens):
            block_id = seq.block_table[i]
            if block_id in self.slots:
                self.idle.pop(block_id, None)
            else:
                self.slots[block_id] = self._free_slot()

    def _free_slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        block_id, _ = self.idle.popitem(last=False)
        return self.slots.pop(block_id)

    def use(self, table: list[int], num_kv_tokens: int) -> None:
        """The blocks of the zone at ``num_kv_tokens`` are read again (prefix hits taken, a cut)."""
        for i in self.zone(num_kv_tokens):
            self.idle.pop(table[i], None)

    def leave_zone(self, seq: Sequence) -> None:
        """Staged blocks of ``seq`` (only it holds them) before the zone of its next token: idle (back to
        the last block made idle before)."""
        table = seq.block_table
        for i in range(seq.num_kv_tokens // self.block_size - self.residual_blocks, 0, -1):
            block_id = table[i]
            if block_id in self.idle:
                break
            if block_id in self.slots and self.blocks[block_id].ref_count == 1:
                self.idle[block_id] = None

    def freed(self, block_id: int) -> None:
        if block_id in self.slots:
            self.idle[block_id] = None

    def reused(self, block_id: int) -> None:
        """The block is taken for other contents: its slot is free."""
        if (slot := self.slots.pop(block_id, None)) is not None:
            self.idle.pop(block_id, None)
            self.free_slots.append(slot)

    def longest_hit(self, found: list[int]) -> int:
        """How many of the cached blocks ``found`` a sequence can take: the most whose first computed
        token's zone is all staged."""
        for n in range(len(found), 0, -1):
            if all(found[i] >= 0 and found[i] in self.slots for i in self.zone(n * self.block_size)):
                return n
        return 0

    def held(self, seq: Sequence, num_kv_tokens: int) -> int:
        """The longest cut of ``seq``'s table at most ``num_kv_tokens`` slots long whose next token's zone
        (and partial last block) is all staged: what is kept of a cut at ``num_kv_tokens``."""
        bs, table = self.block_size, seq.block_table
        while num_kv_tokens:
            own = [num_kv_tokens // bs] if num_kv_tokens % bs else []
            missing = [i for i in self.zone(num_kv_tokens) + own if i >= len(table) or table[i] not in self.slots]
            if not missing:
                return num_kv_tokens
            num_kv_tokens = min(missing) * bs
        return 0
