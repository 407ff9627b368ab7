"""KV connector: the KV blocks of a token prefix, out of one engine's cache and into another's.

:meth:`KVConnector.send` reads the cached blocks that hold the longest prefix of a token list
(full blocks only: the prefix cache's unit) into a :class:`KVTransfer`; :meth:`KVConnector.receive`
writes them into another engine's cache as cached prefix blocks, under the same chain hashes, so
that a request for those tokens there finds them as prefix hits and computes only the rest.  Both
engines must have the same model, block size and KV dtype (checked).  What is moved is plain bytes
(numpy arrays, which Ray's object store hands over without copying) plus the token ids, from which
the receiver recomputes the hashes: nothing is executed or unpickled from model data.

Disaggregated prefill and decode (:mod:`infera.distributed.replica_pool`) sends a prompt's KV from
a prefill replica to a decode replica; the same pair of calls serves KV offload or migrating a
sequence between replicas.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from infera.engine.block_manager import BlockManager
from infera.engine.kv_cache import KVCachePool


@dataclass
class KVTransfer:
    """The KV of ``token_ids``'s blocks (``len(token_ids)`` is a multiple of ``block_size``):
    ``data`` holds the raw bytes of ``[2, layers, blocks, block_size, kv_heads, head_dim]`` of
    ``dtype``, ``scales`` the int8 cache's float32 scales (``[2, layers, blocks, block_size, kv_heads]``)."""

    token_ids: list[int]
    block_size: int
    dtype: str
    block_shape: tuple[int, ...]  # (2, layers, block_size, kv_heads, head_dim)
    data: np.ndarray
    scales: np.ndarray | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.token_ids) // self.block_size

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)


def _layout(kv_cache: KVCachePool) -> tuple[str, tuple[int, ...]]:
    two, layers, _, bs, heads, head_dim = kv_cache.data.shape
    return str(kv_cache.dtype).removeprefix("torch."), (two, layers, bs, heads, head_dim)


def _tensor(array: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; they are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).view(dtype).reshape(shape)


class KVConnector:
    """Sends and receives the KV blocks of one engine's cache (its block manager and KV pool)."""

    def __init__(self, block_manager: BlockManager, kv_cache: KVCachePool):
        self.block_manager = block_manager
        self.kv_cache = kv_cache

    def send(self, token_ids: list[int]) -> KVTransfer | None:
        """The cached KV of the longest prefix of ``token_ids`` held here in full blocks, or None
        if there is none (always, from a hybrid KV cache: a transfer carries one group's blocks, and a
        prefix hit there needs the sliding groups' too; and from a 2-bit cache, whose hits need the
        exact rows of staging slots)."""
        if self.block_manager.window is not None or self.block_manager.staging is not None:
            return None
        block_ids = self.block_manager.cached_prefix(token_ids)
        if not block_ids:
            return None
        bs = self.block_manager.block_size
        dtype, shape = _layout(self.kv_cache)
        data, scales = self.kv_cache.read_blocks(block_ids)
        return KVTransfer(list(token_ids[:len(block_ids) * bs]), bs, dtype, shape,
                          data.view(torch.uint8).cpu().numpy(), None if scales is None else scales.cpu().numpy())

    def receive(self, transfer: KVTransfer) -> int:
        """Write ``transfer``'s blocks into this cache as cached prefix blocks (those already cached
        here are kept); returns how many were written.  Raises ValueError when the two caches differ."""
        bs = self.block_manager.block_size
        dtype, shape = _layout(self.kv_cache)
        if (transfer.block_size, transfer.dtype, tuple(transfer.block_shape)) != (bs, dtype, shape):
            raise ValueError(f"KV blocks of {transfer.dtype} {tuple(transfer.block_shape)} (block size "
                             f"{transfer.block_size}) do not fit this cache: {dtype} {shape} (block size {bs})")
        n = transfer.num_blocks
        expected = n * (int(np.prod(shape)) * self.kv_cache.data.element_size()
                        + (int(np.prod(shape[:4])) * 4 if self.kv_cache.scales is not None else 0))
        if transfer.nbytes != expected or (transfer.scales is None) != (self.kv_cache.scales is None):
            raise ValueError(f"KV transfer of {n} blocks carries {transfer.nbytes} bytes, expected {expected}")
        new = self.block_manager.add_cached_blocks(transfer.token_ids)
        if self.block_manager.pending_copies:  # blocks it evicted go to the host tier before they are written
            self.kv_cache.copy_blocks(self.block_manager.pending_copies)
            self.block_manager.pending_copies = []
        if not new:
            return 0
        data = _tensor(transfer.data, self.kv_cache.dtype, (shape[0], shape[1], n, *shape[2:]))
        scales = None if transfer.scales is None else _tensor(transfer.scales, torch.float32,
                                                              (shape[0], shape[1], n, *shape[2:4]))
        index = torch.tensor([i for i, _ in new])
        self.kv_cache.write_blocks([block_id for _, block_id in new], data[:, :, index],
                                   None if scales is None else scales[:, :, index])
        return len(new)
