"""A worker: one loaded model and what runs it (tokenizer, model runner with its KV cache, block manager)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from infera.config import EngineConfig
from infera.engine.block_manager import BlockManager
from infera.engine.kv_cache import KVCachePool, kv_cache_groups
from infera.engine.kv_connector import KVConnector
from infera.engine.model_runner import ModelRunner
from infera.layers.attention import Attention
from infera.loader.generation_config import sampling_defaults
from infera.loader.gguf_file import GGUFFile
from infera.loader.model_loader import build_model, open_model, resolve_quantization
from infera.loader.safetensors_dir import SafetensorsDir
from infera.loader.tokenizer import Tokenizer
from infera.models.registry import runs_sliding_windows

logger = logging.getLogger(__name__)

# (opened source, its HF config, dtype, device, context length) -> the model with its weights loaded
ModelFactory = Callable[[GGUFFile | SafetensorsDir, PretrainedConfig, torch.dtype, torch.device, int], nn.Module]


class Worker:
    """The model at ``config.model`` built from ``config``: its tokenizer, a :class:`ModelRunner` over
    a KV cache of ``config.kv_cache_memory`` (or of room for ``kv_cache_tokens`` tokens), a
    :class:`BlockManager` over that cache and a :class:`KVConnector` that moves its blocks.  The
    engine, a draft model, self-drafting and a reward model each run on one.  ``load_model`` builds
    a model other than the checkpoint's causal LM (a reward model's head model, say);
    ``quantization`` is then not applied.  ``default_sampling_params``: the sampling defaults
    ``config.generation_config`` chooses (SamplingParams fields)."""

    def __init__(self, config: EngineConfig, load_model: ModelFactory | None = None,
                 kv_cache_tokens: int | None = None):
        self.config = config
        source = open_model(config.model)
        self.model_path = str(source.path)
        self.hf_config = source.config()
        self.tokenizer = Tokenizer(source.tokenizer_dir(), self.hf_config)
        self.default_sampling_params = sampling_defaults(config.generation_config, source)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        limit = config.max_model_len or self.hf_config.max_position_embeddings
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True) and not runs_sliding_windows(self.hf_config):
            limit = min(limit, window)  # this model's sliding-window attention does not run: stay inside the window
        self.quantization = None
        if load_model is None:
            self.quantization = resolve_quantization(source, config.quantization, config.dtype, self.device)
            model = build_model(source, self.hf_config, self.dtype, self.device, limit, self.quantization)
        else:
            model = load_model(source, self.hf_config, self.dtype, self.device, limit)
        kv_cache_memory = config.kv_cache_memory
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        hybrid = len(kv_cache_groups(layers, not config.disable_hybrid_kv_cache_manager)) > 1
        if kv_cache_tokens is not None:
            block_bytes = KVCachePool.block_bytes(layers, config.block_size, self.dtype, config.kv_cache_dtype)
            kv_cache_memory = -(-kv_cache_tokens // config.block_size) * block_bytes
        self.runner = ModelRunner(model, config.block_size, kv_cache_memory, self.tokenizer.eos_token_ids,
                                  self.device, config.seed, config.kv_cache_dtype, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=limit,
                                  gpu_memory_utilization=config.gpu_memory_utilization,
                                  enforce_eager=config.enforce_eager,
                                  kv_offloading_memory=self._host_tier_bytes(config, hybrid),
                                  hybrid=hybrid)
        kv = self.runner.kv_cache
        self.block_manager = BlockManager(kv.num_blocks, config.block_size, config.enable_prefix_caching,
                                          kv.num_host_blocks, kv.num_window_groups, kv.sliding_window,
                                          kv.num_staging_slots, kv.residual_blocks)
        if self.block_manager.staging is not None:
            kv.staging_slots = self.block_manager.staging.slots  # the runner reads the block manager's
        self.kv_connector = KVConnector(self.block_manager, self.runner.kv_cache)
        # a sequence fits the KV cache, unless the engine's KV policy evicts (then the model's limit)
        self.max_model_len = limit if config.kv_policy != "none" else min(limit, self.kv_cache_tokens)

    @staticmethod
    def _host_tier_bytes(config: EngineConfig, hybrid: bool) -> int:
        if not config.kv_offloading_size:
            return 0
        if not config.enable_prefix_caching:  # e.g. an eval that turns the prefix cache off
            logger.warning("kv_offloading_size ignored: the host tier is part of the prefix cache, which is off")
            return 0
        if hybrid:
            logger.warning("kv_offloading_size ignored: the host tier holds full-attention blocks only, and this "
                           "model's KV cache is hybrid (--disable-hybrid-kv-cache-manager gives it one)")
            return 0
        return int(config.kv_offloading_size * 2**30)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache holds (of one sequence, on a hybrid cache)."""
        return self.block_manager.max_tokens(self.config.max_num_batched_tokens)

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens the prefix cache can hold: the KV cache's and its host tier's."""
        return self.kv_cache_tokens + self.runner.kv_cache.num_host_blocks * self.config.block_size

    def copy_pending_blocks(self) -> None:
        """Copy now the blocks the block manager split copy-on-write (the scheduler leaves them to
        the next step; a draft pass that reads them cannot wait)."""
        if self.block_manager.pending_copies:
            self.runner.kv_cache.copy_blocks(self.block_manager.pending_copies)
            self.block_manager.pending_copies = []
