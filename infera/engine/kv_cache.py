"""The KV-cache pool: one preallocated tensor per K and V for all layers, addressed by block."""
from __future__ import annotations

import torch

from infera.layers.attention import Attention, LayerKVCache


class KVCachePool:
    """``[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` of the model's dtype,
    or int8 plus a float32 scale per token and head (``kv_cache_dtype='int8'``: about half the
    bytes of bfloat16)."""

    def __init__(self, layers: list[Attention], block_size: int, memory: int, dtype: torch.dtype,
                 kv_cache_dtype: str, device: torch.device):
        first = layers[0]
        self.quantized = kv_cache_dtype == "int8"
        self.dtype = torch.int8 if self.quantized else dtype
        per_token_head = first.head_dim * self.dtype.itemsize + (4 if self.quantized else 0)
        self.bytes_per_block = 2 * len(layers) * block_size * first.num_kv_heads * per_token_head
        self.num_blocks = memory // self.bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {memory} bytes holds no block of {self.bytes_per_block} bytes")
        shape = (2, len(layers), self.num_blocks, block_size, first.num_kv_heads)
        self.data = torch.zeros(*shape, first.head_dim, dtype=self.dtype, device=device)
        self.scales = torch.ones(*shape, dtype=torch.float32, device=device) if self.quantized else None
        for i, layer in enumerate(layers):
            scales = (self.scales[0, i], self.scales[1, i]) if self.quantized else (None, None)
            layer.kv_cache = LayerKVCache(self.data[0, i], self.data[1, i], *scales)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block ``dst`` gets the contents of block ``src`` in every layer."""
        src, dst = (torch.tensor(x, device=self.data.device) for x in zip(*pairs))
        self.data[:, :, dst] = self.data[:, :, src]
        if self.scales is not None:
            self.scales[:, :, dst] = self.scales[:, :, src]
