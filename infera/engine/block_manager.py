"""Paged KV-cache bookkeeping: ref-counted blocks, a hash-chain prefix cache, copy-on-write.

Pure Python over integer block ids; the tensors live in the model runner.
"""
from __future__ import annotations

from collections import OrderedDict

from infera.engine.kivi_staging import KiviStaging
from infera.engine.kv_offload import HostBlockPool
from infera.engine.sequence import Sequence
from infera.engine.sliding_window import SlidingWindowManager


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` token slots each.

    A full block is content-addressed by ``hash((previous block's hash, its token ids))``, so
    equal prefixes map to equal chains.  Freed blocks keep their hash and stay findable until
    they are reused (least recently freed first, the tail of a sequence before its head).
    Sharing is by reference count: prefix hits and :meth:`fork` never copy KV; the one block a
    sequence writes into while another still reads it is copied first (copy-on-write), and
    the (src, dst) pairs wait in :attr:`pending_copies` for the model runner.

    With ``num_host_blocks`` the prefix cache has a second tier in host memory
    (:mod:`infera.engine.kv_offload`): cached blocks are copied there when evicted, and prefix hits
    there are copied back into new blocks; those copies are ``pending_copies`` too, a host block ``h``
    written ``~h``, to be done in order.

    With ``window_groups`` the pool is a hybrid KV cache's (:mod:`infera.engine.kv_cache`): a
    sequence's ``block_table`` is its full-attention group's, and :attr:`window` keeps the tables of
    the sliding-window groups (``sliding_window`` positions) in blocks of the same pool.

    With ``num_staging_slots`` the pool is a 2-bit cache's: :attr:`staging` gives blocks staging slots
    for the exact keys and values of the last ``residual_blocks`` blocks and the first
    (:mod:`infera.engine.kivi_staging`).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, window_groups: int = 0, sliding_window: int = 0,
                 num_staging_slots: int = 0, residual_blocks: int = 1):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        if num_host_blocks and not enable_prefix_caching:
            raise ValueError("--kv-offloading-size makes a host tier of the prefix cache: it needs prefix caching "
                             "(drop --no-enable-prefix-caching)")
        if window_groups and num_host_blocks:
            raise ValueError("a hybrid KV cache (sliding-window groups) has no host tier")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.host = HostBlockPool(num_host_blocks) if num_host_blocks else None
        self.num_offloaded_blocks = 0  # copied to the host tier
        self.num_loaded_blocks = 0  # copied back from it
        self.window = SlidingWindowManager(self, window_groups, sliding_window) if window_groups else None
        self.staging = (KiviStaging(num_staging_slots, block_size, residual_blocks, self.blocks)
                        if num_staging_slots else None)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_kv_groups(self) -> int:
        """The KV-cache groups: the blocks of the pool one block of a sequence's context takes while its
        sliding windows (if any) reach it."""
        return 1 + (self.window.num_groups if self.window else 0)

    def max_tokens(self, max_new_tokens: int) -> int:
        """The longest sequence the pool holds while a step adds up to ``max_new_tokens`` tokens."""
        if self.window is None:
            return self.num_blocks * self.block_size
        per_group = self.window.max_blocks(max_new_tokens)  # a long sequence's, in each sliding group
        if self.num_blocks >= per_group * self.num_kv_groups:
            return (self.num_blocks - self.window.num_groups * per_group) * self.block_size
        return self.num_blocks // self.num_kv_groups * self.block_size

    def num_held_blocks(self, seq: Sequence) -> int:
        """Blocks of the pool ``seq``'s tables hold (shared ones included)."""
        return len(seq.block_table) + sum(len(t) - seq.window_freed for t in seq.window_tables)

    def num_staged_slots(self, seq: Sequence) -> int:
        """Staging slots (of a 2-bit cache) that blocks of ``seq``'s table hold and a query reads."""
        if self.staging is None:
            return 0
        return sum(1 for b in seq.block_table if b in self.staging.slots and b not in self.staging.idle)

    # -- prefix cache -------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence, limit: int | None = None) -> list[int]:
        """Cached blocks that hold a prefix of ``seq`` (at least one token is left to compute; at most
        ``limit`` tokens)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        if seq.pooling is not None and seq.pooling.needs_every_token:
            return []
        end = seq.compute_target - 1 if limit is None else min(seq.compute_target - 1, limit)
        found = self.cached_prefix(seq.token_ids[:end // self.block_size * self.block_size], host=True)
        if self.staging is not None:
            found = found[:self.staging.longest_hit(found)]
        return found[:self.window.longest_hit(found)] if self.window is not None else found

    def cached_prefix(self, token_ids: list[int], host: bool = False) -> list[int]:
        """The cached blocks holding the longest prefix of ``token_ids``'s full blocks; with ``host``,
        blocks of the host tier continue it (``~h`` for host block h)."""
        bs = self.block_size
        found: list[int] = []
        prev = 0
        for i in range(len(token_ids) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            prev = hash((prev, tokens))
            block_id = self.hash_to_block.get(prev)
            if block_id is not None and self.blocks[block_id].token_ids == tokens:
                found.append(block_id)
            elif host and self.host is not None and (slot := self.host.lookup(prev, tokens)) is not None:
                found.append(~slot)
            else:
                break
        return found

    def add_cached_blocks(self, token_ids: list[int]) -> list[tuple[int, int]]:
        """Make the full blocks of ``token_ids`` cached prefix blocks (KV received from elsewhere):
        returns ``(i, block_id)`` for each block ``i`` of them that was not cached yet, whose KV the
        caller writes now.  They are taken from the free blocks (evicting the least recently freed)
        and stay free and findable, most recently freed.  Stops at the first block that does not fit
        (the rest would be unreachable without it)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        new: list[tuple[int, int]] = []
        claimed: set[int] = set()
        prev = 0
        for i in range(len(token_ids) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            prev = hash((prev, tokens))
            block_id = self.hash_to_block.get(prev)
            if block_id is not None and self.blocks[block_id].token_ids == tokens:
                claimed.add(block_id)
                if block_id in self.free_ids:
                    self.free_ids.move_to_end(block_id)  # used again: evicted last
                continue
            oldest = next(iter(self.free_ids), None)
            if oldest is None or oldest in claimed:  # no room: taking it would evict this prefix's own blocks
                break
            block_id = self._new_block()
            block = self.blocks[block_id]
            block.ref_count = 0
            block.hash, block.token_ids = prev, tokens
            self.hash_to_block[prev] = block_id
            self.free_ids[block_id] = None
            claimed.add(block_id)
            new.append((i, block_id))
        return new

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; only while no sequence holds blocks."""
        if self.num_free_blocks != self.num_blocks:
            raise RuntimeError("cannot reset the prefix cache while sequences hold KV blocks")
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = block.token_ids = None
        if self.host is not None:
            self.host.clear()
        if self.window is not None:
            self.window.reset()

    def _cache_full_blocks(self, seq: Sequence, start_token: int) -> None:
        """Hash the blocks that became full and computed since ``start_token``."""
        bs = self.block_size
        for i in range(start_token // bs, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            prev = self.blocks[seq.block_table[i - 1]].hash if i else 0
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = hash((prev, tokens))
            block.token_ids = tokens
            self.hash_to_block.setdefault(block.hash, block.block_id)

    # -- allocation -----------------------------------------------------------------------
    def _new_block(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if self.host is not None and block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            slot = self.host.store(block.hash, block.token_ids)  # evicted from the device: keep it on the host
            if slot is not None:
                self.pending_copies.append((block_id, ~slot))
                self.num_offloaded_blocks += 1
        self._unhash(block)
        if self.staging is not None:
            self.staging.reused(block_id)
        block.ref_count = 1
        return block_id

    def _needs_cow(self, seq: Sequence) -> bool:
        idx = seq.num_kv_tokens // self.block_size
        return idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None,
                       reserve: int = 0) -> bool:
        """Give ``seq`` slots for its next ``num_new_tokens`` tokens, taking ``computed_blocks``
        (prefix hits, only for a sequence with no blocks yet; host-tier hits get new blocks their KV
        is copied into) first.

        Returns False and changes nothing if that needs more than ``num_free_blocks - reserve`` (but
        the sliding blocks no later query of ``seq`` reads are released either way).
        """
        computed_blocks = computed_blocks or []
        if computed_blocks and seq.block_table:
            raise ValueError("prefix hits are only taken by a sequence that holds no blocks")
        hit = self.window.hit(computed_blocks) if self.window is not None and computed_blocks else None
        num_table = len(seq.block_table) + len(computed_blocks)
        computed = max(seq.num_kv_tokens, len(computed_blocks) * self.block_size)
        needed = max(0, self.blocks_for(computed + num_new_tokens) - num_table)
        needed += sum(1 for b in computed_blocks if b < 0 or self.blocks[b].ref_count == 0)
        cow = not computed_blocks and self._needs_cow(seq)
        if self.window is not None:
            self.window.release(seq)
            needed += self.window.needed(seq, num_new_tokens, hit)
        if self.staging is not None:
            self.staging.leave_zone(seq)
            if not self.staging.fits(seq, num_new_tokens, computed, cow, computed_blocks):
                return False
        if needed + cow > self.num_free_blocks - reserve:
            return False
        for block_id in computed_blocks:  # device hits first: blocks taken for the host hits must not evict them
            if block_id >= 0:
                self.take(block_id)
        if hit is not None:
            self.window.take_hit(seq, hit)
        host_slots = [~b for b in computed_blocks if b < 0]
        held = iter(self.host.hold(host_slots) if host_slots else ())
        for block_id in computed_blocks:
            if block_id < 0:
                block_id = self._load(~block_id, *next(held))
            seq.block_table.append(block_id)
        if host_slots:
            self.host.release(host_slots)
        if computed_blocks:
            seq.num_computed_tokens = seq.num_cached_tokens = len(computed_blocks) * self.block_size
            if self.staging is not None:
                self.staging.use(seq.block_table, seq.num_kv_tokens)
        if cow:
            idx = seq.num_kv_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._new_block()
            self.blocks[src].ref_count -= 1
            seq.block_table[idx] = dst
            self.pending_copies.append((src, dst))
        for _ in range(self.blocks_for(seq.num_kv_tokens + num_new_tokens) - len(seq.block_table)):
            seq.block_table.append(self._new_block())
        if self.window is not None:
            self.window.allocate(seq, num_new_tokens)
        if self.staging is not None:
            self.staging.assign(seq, num_new_tokens)
        return True

    def take(self, block_id: int) -> None:
        """A cached block joins one more table (out of the free blocks if none held it)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _load(self, slot: int, block_hash: int, token_ids: tuple[int, ...]) -> int:
        """A new block that gets host block ``slot``'s KV (``block_hash``'s) and is cached under its hash."""
        block_id = self._new_block()
        block = self.blocks[block_id]
        block.hash, block.token_ids = block_hash, token_ids
        self.hash_to_block[block_hash] = block_id
        self.pending_copies.append((~slot, block_id))
        self.num_loaded_blocks += 1
        return block_id

    def commit(self, seq: Sequence, num_new_tokens: int) -> None:
        """Mark ``num_new_tokens`` more tokens of ``seq`` as computed and cache the full blocks
        (not after an eviction: their KV was computed without the evicted context)."""
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_new_tokens
        if self.enable_prefix_caching and not seq.num_evicted_tokens:
            self._cache_full_blocks(seq, start)
            if self.window is not None:
                self.window.cache_blocks(seq, start)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent``; neither KV nor tables are copied twice."""
        if child.block_table:
            raise ValueError("fork target already holds blocks")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_evicted_tokens, child.evicted_from = parent.num_evicted_tokens, parent.evicted_from
        child.kept_from, child.kv_pinned = parent.kept_from, parent.kv_pinned
        if self.window is not None:
            self.window.fork(parent, child)

    def free(self, seq: Sequence) -> None:
        """Release all blocks of ``seq`` (tail first, so prefixes are evicted last)."""
        self._release(seq.block_table)
        seq.block_table = []
        if self.window is not None:
            self.window.free(seq)
        seq.num_computed_tokens = seq.num_evicted_tokens = seq.evicted_from = seq.kept_from = seq.kv_pinned = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep KV for the first ``num_tokens`` tokens only (speculative-decoding rollback); a cut
        before the kept tail of an evicted sequence keeps only the tokens before its first hole, one
        whose sliding windows were released keeps none, one in a 2-bit cache only what its staged
        blocks still read exactly."""
        num_tokens = self._window_held(seq, num_tokens)
        if seq.num_evicted_tokens and num_tokens < seq.kept_from:
            num_tokens = self._window_held(seq, min(num_tokens, seq.evicted_from))
            seq.num_evicted_tokens = seq.evicted_from = seq.kept_from = seq.kv_pinned = 0
        if self.staging is not None:  # (a 2-bit cache) what the staged zone still reads exactly
            held = self.staging.held(seq, num_tokens - seq.num_evicted_tokens) + seq.num_evicted_tokens
            if held < num_tokens and seq.num_evicted_tokens and held < seq.kept_from:
                held = seq.num_evicted_tokens = seq.evicted_from = seq.kept_from = seq.kv_pinned = 0
            num_tokens = held
            self.staging.use(seq.block_table, num_tokens - seq.num_evicted_tokens)
        keep = self.blocks_for(num_tokens - seq.num_evicted_tokens)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
        if self.window is not None:
            self.window.truncate(seq, num_tokens)
        if num_tokens % self.block_size and seq.block_table:
            self.unhash_unshared(seq.block_table[-1])  # it will be written again

    def _window_held(self, seq: Sequence, num_tokens: int) -> int:
        """``num_tokens``, or 0 if ``seq``'s sliding windows no longer hold what its next query would read."""
        return num_tokens if self.window is None or self.window.holds_window(seq, num_tokens) else 0

    def evict(self, seq: Sequence, indices: list[int]) -> None:
        """Drop the blocks at ``indices`` of ``seq``'s table (full blocks: never its last) and free
        those no other sequence holds; they stay findable in the prefix cache."""
        if not indices:
            return
        bs, e = self.block_size, seq.num_evicted_tokens
        drop = sorted(set(indices))
        if drop[0] < 0 or drop[-1] >= len(seq.block_table) - 1:
            raise ValueError(f"cannot evict blocks {drop} of a table of {len(seq.block_table)}: only full blocks "
                             "before the last")
        natural = seq.evicted_from // bs if e else len(seq.block_table)  # entries at their own slots before it
        tail = (seq.kept_from - e) // bs if e else 0  # entries of the kept tail from here (token = slot + e)
        if drop[0] < natural:
            seq.evicted_from = drop[0] * bs
        if drop[-1] >= tail:
            seq.kept_from = (drop[-1] + 1) * bs + e
        self._release([seq.block_table[i] for i in drop])
        for i in reversed(drop):
            del seq.block_table[i]
        seq.num_evicted_tokens += len(drop) * bs

    def _release(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
                if self.staging is not None:
                    self.staging.freed(block_id)

    def unhash_unshared(self, block_id: int) -> None:
        """Forget the contents of a block about to be written again, unless it is shared (then it is
        copied first)."""
        if self.blocks[block_id].ref_count == 1:
            self._unhash(self.blocks[block_id])

    def _unhash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        if block.hash is not None and self.window is not None:
            self.window.unhash(block.block_id, block.hash)
        block.hash = None
        block.token_ids = None
