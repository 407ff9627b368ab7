"""The KV-cache pool: one preallocated tensor per K and V for all layers, addressed by block.

With sliding-window layers (Gemma 3: five local layers per global one) the pool is hybrid, as vLLM's:
the layers form KV-cache groups of equal size, the full-attention layers one group and the sliding
ones the others (:func:`kv_cache_groups`), and a block id (a page) holds one block of one group's
layers.  Each sequence then has a block table per group (:mod:`infera.engine.sliding_window`): the
full group's holds its whole context, a sliding group's only the blocks its window still reaches,
all drawn from one pool.  A context of n tokens then holds about (full + sliding * window / n) /
layers of the KV it holds in a plain pool: Gemma 3 (3 of 18 layers full, a window of 512) about a
fifth at 32k tokens.
"""
from __future__ import annotations

import torch

from infera.layers import kivi
from infera.layers.attention import Attention, LayerKVCache


CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
                "kivi2": torch.uint8}  # else the model's
STAGING_SHARE = 8  # kivi2: staging slots take at most 1 / STAGING_SHARE of the KV cache's memory


def kv_cache_groups(layers: list[Attention], hybrid: bool) -> list[list[Attention]]:
    """The layers' KV-cache groups: all layers in one, or (``hybrid``, with both kinds of layers and
    no more full-attention layers than sliding ones) the full-attention layers first, then the
    sliding layers in groups of as many (the last may be short: its pages' other slots go unused)."""
    full = [layer for layer in layers if not layer.sliding_window]
    sliding = [layer for layer in layers if layer.sliding_window]
    if not hybrid or not full or len(full) > len(sliding) or len({layer.sliding_window for layer in sliding}) > 1:
        return [layers]
    return [full] + [sliding[i:i + len(full)] for i in range(0, len(sliding), len(full))]


class KVCachePool:
    """``[2, group_size, num_blocks, block_size, num_kv_heads, head_dim]`` of the model's dtype,
    of a 16-bit float (``kv_cache_dtype='float16'`` or ``'bfloat16'``: K and V rounded as they are
    stored), or int8 plus a float32 scale per token and head (``kv_cache_dtype='int8'``: about
    half the bytes of a 16-bit cache), or 2-bit codes (``kv_cache_dtype='kivi2'``, :mod:`infera.layers.kivi`:
    ``head_dim / 4`` bytes a row, with bfloat16 parameters per block and channel for keys and per
    token and group of channels for values, and ``num_staging_slots`` blocks of exact 16-bit keys and
    values, ``residual_blocks + 2`` for each of ``max_num_seqs`` sequences within an eighth of the
    memory, out of the same memory); layer ``j`` of each group (:func:`kv_cache_groups`) reads slot
    ``j``, so a block holds one block of one group's layers.  ``host_memory`` bytes of host blocks of the same layout
    (pinned on CUDA) are the host tier of the prefix cache (:mod:`infera.engine.kv_offload`)."""

    def __init__(self, groups: list[list[Attention]], block_size: int, memory: int, dtype: torch.dtype,
                 kv_cache_dtype: str, device: torch.device, host_memory: int = 0, max_num_seqs: int = 256):
        first, group_size = groups[0][0], len(groups[0])
        heads, dim = first.num_kv_heads, first.head_dim
        self.num_window_groups = len(groups) - 1
        self.sliding_window = groups[-1][0].sliding_window if self.num_window_groups else 0
        self.quantized = kv_cache_dtype == "int8"
        self.kivi = kv_cache_dtype == "kivi2"
        self.dtype = CACHE_DTYPES.get(kv_cache_dtype, dtype)
        if self.kivi:
            kivi.check_head_dim(dim)
            if device.type == "cuda" or self.num_window_groups:
                raise ValueError("a kivi2 KV cache runs on the CPU, in a plain (not hybrid) KV cache: use --device cpu"
                                 + (" and --disable-hybrid-kv-cache-manager" if self.num_window_groups else ""))
        elif device.type == "cuda" and not self.quantized and self.dtype != dtype:
            raise ValueError(f"a {kv_cache_dtype} KV cache needs a {kv_cache_dtype} model on CUDA (the Triton "
                             f"kernels read the cache in the queries' dtype); use --dtype {kv_cache_dtype} or auto")
        self.num_staging_slots, self.residual_blocks = 0, kivi.residual_blocks(block_size)
        if self.kivi:
            per_seq, stage_dtype = self.residual_blocks + 2, kivi.stage_dtype(dtype)  # (a decoding sequence's)
            slot_bytes = group_size * 2 * block_size * heads * dim * stage_dtype.itemsize
            self.num_staging_slots = max(2 * self.residual_blocks + 2,
                                         min(per_seq * max_num_seqs, memory // STAGING_SHARE // slot_bytes))
            memory -= self.num_staging_slots * slot_bytes
        self.bytes_per_block = self.block_bytes(groups[0], block_size, dtype, kv_cache_dtype)
        self.model_bytes_per_block = self.block_bytes(groups[0], block_size, dtype, "auto")  # (in the model's dtype)
        self.num_blocks = memory // self.bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {memory} bytes holds no block of {self.bytes_per_block} bytes")
        self.num_host_blocks = host_memory // self.bytes_per_block
        if host_memory and not self.num_host_blocks:
            raise ValueError(f"kv_offloading_size of {host_memory} bytes holds no block of "
                             f"{self.bytes_per_block} bytes")
        pin = device.type == "cuda"

        def arrays(blocks: int, on: torch.device | str) -> list[torch.Tensor]:
            """The pool's tensors, [2 or 1, layers, blocks, ...] each: K and V, then scales or parameters."""
            shape = (2, group_size, blocks, block_size, heads)
            kw = {"device": on, "pin_memory": pin and on == "cpu"}
            if self.kivi:
                return [torch.zeros(*shape, dim // 4, dtype=self.dtype, **kw),
                        torch.zeros(1, group_size, blocks, heads, 2, dim, dtype=kivi.PARAM_DTYPE, **kw),
                        torch.zeros(1, group_size, blocks, block_size, heads, 2, dim // kivi.value_group(dim),
                                    dtype=kivi.PARAM_DTYPE, **kw)]
            data = torch.zeros(*shape, dim, dtype=self.dtype, **kw)
            return [data, torch.ones(*shape, dtype=torch.float32, **kw)] if self.quantized else [data]

        self.arrays, self.host_arrays = arrays(self.num_blocks, device), arrays(self.num_host_blocks, "cpu")
        self.data, self.host_data = self.arrays[0], self.host_arrays[0]
        self.scales = self.arrays[1] if self.quantized else None
        self.staging = torch.zeros(group_size, self.num_staging_slots, 2, block_size, heads, dim,
                                   dtype=kivi.stage_dtype(dtype), device=device) if self.kivi else None
        self.staging_slots: dict[int, int] = {}  # kivi2: block id -> staging slot (the block manager's)
        for g, group in enumerate(groups):
            for i, layer in enumerate(group):
                if self.kivi:
                    cache = LayerKVCache(self.data[0, i], self.data[1, i], k_params=self.arrays[1][0, i],
                                         v_params=self.arrays[2][0, i], staging=self.staging[i])
                else:
                    scales = (self.scales[0, i], self.scales[1, i]) if self.quantized else (None, None)
                    cache = LayerKVCache(self.data[0, i], self.data[1, i], *scales)
                layer.kv_cache = cache
                layer.kv_group = g

    @staticmethod
    def block_bytes(layers: list[Attention], block_size: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
        """Bytes of one block of ``layers``, K and V (and int8 scales, or 2-bit codes' parameters)."""
        stored = CACHE_DTYPES.get(kv_cache_dtype, dtype)
        heads, dim = layers[0].num_kv_heads, layers[0].head_dim
        if kv_cache_dtype == "kivi2":  # codes, key parameters per channel, value parameters per token and group
            param = kivi.PARAM_DTYPE.itemsize
            per_layer = (2 * block_size * dim // 4 + 2 * dim * param
                         + block_size * 2 * (dim // kivi.value_group(dim)) * param) * heads
            return len(layers) * per_layer
        per_token_head = dim * stored.itemsize + (4 if stored == torch.int8 else 0)
        return 2 * len(layers) * block_size * heads * per_token_head

    def held_bytes(self, num_blocks: int, num_staged_slots: int = 0) -> int:
        """Bytes of ``num_blocks`` blocks and ``num_staged_slots`` staging slots (a 2-bit cache's)."""
        return num_blocks * self.bytes_per_block + (num_staged_slots * self.staging[:, 0].nbytes if self.kivi else 0)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of these blocks' K/V (``[2, layers, len(block_ids), block_size, heads, head_dim]``)
        and their int8 scales (None for a float cache)."""
        index = torch.tensor(block_ids, device=self.data.device)
        return (self.data[:, :, index].contiguous(),
                None if self.scales is None else self.scales[:, :, index].contiguous())

    def write_blocks(self, block_ids: list[int], data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Set these blocks' K/V (and int8 scales) to what :meth:`read_blocks` returned elsewhere."""
        index = torch.tensor(block_ids, device=self.data.device)
        self.data[:, :, index] = data.to(self.data.device)
        if self.scales is not None:
            self.scales[:, :, index] = scales.to(self.scales.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block ``dst`` gets the contents of block ``src`` in every layer, pair after pair: device blocks
        (copy-on-write), or ``~h`` for host block ``h`` (offloads and loads of the host tier)."""
        for run in _runs(pairs):
            src_host, dst_host = run[0][0] < 0, run[0][1] < 0
            src, dst = ([~i if host else i for i in ids] for ids, host in zip(zip(*run), (src_host, dst_host)))
            src = torch.tensor(src, device="cpu" if src_host else self.data.device)
            dst = torch.tensor(dst, device="cpu" if dst_host else self.data.device)
            for device, host in zip(self.arrays, self.host_arrays):
                target = host if dst_host else device
                target[:, :, dst] = (host if src_host else device)[:, :, src].to(target.device)
        staged = [(self.staging_slots[s], self.staging_slots[d]) for s, d in pairs
                  if s in self.staging_slots and d in self.staging_slots]
        if staged:  # a block split copy-on-write before it was full: its staged rows too
            src, dst = (torch.tensor(ids, device=self.data.device) for ids in zip(*staged))
            self.staging[:, dst] = self.staging[:, src]


def _runs(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``pairs`` cut into runs of one direction (device or host to device or host) in which no block
    is written twice or read after it is written, so that each run is one gathered copy."""
    runs: list[list[tuple[int, int]]] = []
    written: set[int] = set()
    for src, dst in pairs:
        if not runs or (src < 0, dst < 0) != (runs[-1][0][0] < 0, runs[-1][0][1] < 0) or src in written \
                or dst in written:
            runs.append([])
            written = set()
        runs[-1].append((src, dst))
        written.add(dst)
    return runs


def available_kv_cache_memory(device: torch.device, utilization: float) -> int:
    """Bytes a KV cache may take on a CUDA device after a warm-up pass of the largest step, so that
    the device stays within ``utilization`` of its memory: what is in use now (weights, CUDA
    context, other processes) and the warm-up's peak activations come off ``utilization * total``."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    activations = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
    budget = int(total * utilization) - (total - free) - activations
    if budget <= 0:
        gib = 2 ** 30
        raise ValueError(f"gpu_memory_utilization {utilization} leaves no memory for the KV cache: "
                         f"{(total - free) / gib:.2f} GiB in use and {activations / gib:.2f} GiB of activations "
                         f"out of {total / gib:.2f} GiB")
    return budget
