"""Engine configuration."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from infera.arg_utils import option
from infera.kernels import has_bf16_arithmetic
from infera.quant import QUANTIZATION_METHODS
from infera.router import DEFAULT_CACHE_THRESHOLD, DEFAULT_PREFILL_WEIGHT, POLICIES
from infera.sampling_params import DEFAULT_SINK_TOKENS, KV_POLICIES, check_kv_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "int8", "kivi2")
DEFAULT_KV_CACHE_MEMORY = 2 * 2**30  # on CPU, when kv_cache_memory is not given
SPECULATIVE_METHODS = ("ngram", "recycle", "self", "self:LAYERS", "draft:PATH")  # infera.spec's proposers


def parse_size(value: str | int) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5G"`` or a byte count -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", value.lower())
    if not m:
        raise ValueError(f"cannot parse size {value!r} (try 2GiB or 512MB)")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * 1024 ** power)


def check_speculative(method: str) -> None:
    if method not in ("ngram", "recycle", "self") and not method.startswith(("self:", "draft:")):
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}; got {method!r}")
    if method == "draft:":
        raise ValueError("speculative: draft: needs the draft model's path, e.g. draft:/models/small")


@dataclass
class EngineConfig:
    """Everything the engine decides from. ``dtype='auto'`` picks bfloat16 where the hardware
    computes it fast (CUDA, or a CPU ISA level with AVX512-BF16 or AMX, see :mod:`infera.kernels`)
    and float32 elsewhere.
    ``quantization`` (a method of :mod:`infera.quant`) quantizes the weights at load; with None, a
    GGUF model runs on its own quantized tensors when ``dtype`` is auto (on CPU) and is dequantized
    to an explicit ``dtype``. ``kv_cache_memory`` None means 2 GiB on CPU and, on CUDA, what
    ``gpu_memory_utilization`` of the device leaves after a warm-up pass of the largest step.
    On CUDA, decode steps replay CUDA graphs unless ``enforce_eager``.  ``speculative`` turns on
    speculative decoding with a proposer (ngram, recycle, self, self:LAYERS, draft:PATH; see
    :mod:`infera.spec`) drafting up to ``num_speculative_tokens`` tokens per sequence and step.
    Each field is also a flag of the engine commands (:func:`infera.arg_utils.add_dataclass_args`)."""

    model: str | None = option(
        None, flags=("--model", "-m"),
        help="a GGUF file, an HF model directory (config.json + safetensors) or a short name of `infera models` "
             "(qwen2.5-coder-0.5b, qwen2.5-coder-1.5b); None: the bundled SmolLM2-135M-Instruct")
    dtype: str = option("auto", choices=("auto", *DTYPES),
                        help="compute dtype; auto = bfloat16 on CUDA or a CPU with AVX512-BF16/AMX, else float32")
    device: str = option("auto", metavar="auto|cpu|cuda[:N]", help="where the model runs; auto = cuda if available")
    max_model_len: int | None = option(None, help="context length; None: the model's")
    max_num_seqs: int = option(256, help="most sequences running at once")
    max_num_batched_tokens: int = option(1024, help="token budget per engine step (prefill chunks + decodes)")
    block_size: int = option(16, help="tokens per KV-cache block")
    kv_cache_memory: int | str | None = option(
        None, flags=("--kv-cache-memory", "--kv-cache-memory-bytes"),
        help="memory for the KV cache, e.g. 2GiB, 512MB or bytes; None: 2GiB on CPU and, on CUDA, what "
             "--gpu-memory-utilization leaves after a warm-up pass of the largest step")
    kv_cache_dtype: str = option("auto", choices=KV_CACHE_DTYPES,
                                 help="auto = the model's dtype; float16 / bfloat16 = K and V rounded to 16 bits "
                                      "under float32 activations (half the memory and the bytes attention reads, "
                                      "as llama.cpp's default f16 cache); int8 = per-token-and-head scaled int8, "
                                      "about half the memory of a 16-bit cache; kivi2 = 2-bit keys per channel and "
                                      "values per token (KIVI; CPU), about a fourth of a 16-bit cache, combines "
                                      "with any --kv-policy")
    kv_policy: str = option(
        "none", choices=KV_POLICIES,
        help="which KV a long sequence keeps, about --kv-budget tokens of it: none = all; streaming = the first "
             "--kv-sink-tokens tokens (attention sinks) and a recent window (StreamingLLM); snapkv = after the "
             "prompt, the sinks, its last 32 tokens and the blocks they attend to most (SnapKV, whole blocks). "
             "Evicted blocks are freed. Requests may bring their own (kv_policy, kv_budget, kv_sink_tokens)")
    kv_budget: float | None = option(
        None, help="the KV a sequence keeps under --kv-policy: tokens (an integer > 1), or a fraction of the prompt "
                   "in (0, 1] (the generated tokens are kept on top; 1 = full KV)")
    kv_sink_tokens: int = option(DEFAULT_SINK_TOKENS, help="--kv-policy streaming: the first tokens always kept "
                                                          "(rounded up to whole KV blocks)")
    quantization: str | None = option(
        None, choices=QUANTIZATION_METHODS,
        help="quantize the weights at load (CPU kernels): gguf = a GGUF file's own tensors (the default for GGUF "
             "models with --dtype auto; an explicit --dtype dequantizes instead); q8_0/q4_0/q4_1 = GGUF blocks; "
             "int8, int4 (groups along inputs), int4_ic (groups along outputs), llm_int8 (int8 + float outlier "
             "features), dense_sparse (int4 + exact sparse outliers), trit_planes (two ternary planes)")
    enable_prefix_caching: bool = option(True, flags=("--enable-prefix-caching", "--prefix-caching"),
                                         help="reuse the KV cache of shared prompt prefixes")
    kv_offloading_size: float | None = option(
        None, help="GiB of host memory for a second tier of the prefix cache: cached KV blocks evicted from the "
                   "KV cache are copied there and copied back on a prefix hit instead of recomputed (vLLM's "
                   "native KV offloading; pinned memory on CUDA)")
    disable_hybrid_kv_cache_manager: bool = option(
        False, help="models with sliding-window layers (Gemma 3): give every layer the whole context's KV "
                    "instead of the hybrid KV cache, whose sliding layers keep only their window's blocks (about "
                    "5x less KV for Gemma 3 at 32k tokens) and which has no host tier (--kv-offloading-size)")
    seed: int = option(0, help="seed for requests that bring none")
    gpu_memory_utilization: float = option(
        0.9, help="CUDA: the share of the GPU's memory that weights, activations and the KV cache may take, "
                  "when --kv-cache-memory is not given")
    enforce_eager: bool = option(
        False, help="CUDA: run every step eagerly instead of replaying CUDA graphs for decode steps")
    speculative: str | None = option(
        None, metavar="ngram|recycle|self[:LAYERS]|draft:PATH",
        help="speculative decoding (lossless): ngram = prompt lookup (copies from the prompt and output), "
             "recycle = token recycling (the model's earlier predictions), self = the model with some layers "
             "skipped (self:8-20,24 picks them), draft:PATH = a smaller model with the same tokenizer; the number "
             "of draft tokens adapts per sequence and drops to 0 where it does not pay")
    num_speculative_tokens: int = option(8, help="most draft tokens per sequence and step")
    speculative_draft_vocab_size: int = option(
        32768, help="draft:PATH with a larger vocabulary than this: the draft drafts from the first N token ids "
                    "(plus the prompts' tokens and EOS), which cuts its output head's cost; lossless (the target "
                    "verifies every draft); 0 = the whole vocabulary")
    generation_config: str = option(
        "auto", metavar="auto|vllm|FOLDER",
        help="sampling defaults for what a request omits (temperature, top_p, top_k, min_p, repetition_penalty, "
             "max_tokens from max_new_tokens): auto = the model's generation_config.json or GGUF sampling metadata, "
             "vllm = none (the SamplingParams defaults), FOLDER = that folder's generation_config.json")

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; "
                             f"got {self.quantization!r}")
        check_kv_policy(self.kv_policy, self.kv_budget, self.kv_sink_tokens)
        if self.kv_policy != "none" and self.kv_budget is None:
            raise ValueError(f"kv_policy {self.kv_policy} needs a kv_budget (tokens, or a fraction of the prompt)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_offloading_size is not None and self.kv_offloading_size <= 0:
            raise ValueError(f"kv_offloading_size must be > 0 GiB, got {self.kv_offloading_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.speculative is not None:
            check_speculative(self.speculative)
        if self.speculative_draft_vocab_size < 0:
            raise ValueError(f"speculative_draft_vocab_size must be >= 0, got {self.speculative_draft_vocab_size}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 64:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 64], got {self.num_speculative_tokens!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device.type == "cuda" or has_bf16_arithmetic():
            return torch.bfloat16
        return torch.float32


@dataclass
class ParallelConfig:
    """Engine replicas behind one server (``infera serve``): more than one runs each replica's engine
    in a Ray actor (:mod:`infera.distributed`), with requests routed among them by ``routing_policy``;
    ``prefill_replicas`` and ``decode_replicas`` run prompts and decoding on separate replicas."""

    data_parallel_size: int = option(1, flags=("--data-parallel-size", "-dp"),
                                     help="engine replicas, each a Ray actor with the whole model; 1: one engine "
                                          "in the server process (no Ray)")
    threads_per_replica: int = option(1, help="torch threads of each replica (Ray actors only)")
    routing_policy: str = option("cache_aware", choices=POLICIES,
                                 help="which replica serves a request: cache_aware = the one of least estimated "
                                      "cost (the prompt blocks it would prefill, weighted, plus its queued prefill "
                                      "and outstanding requests), longest_prefix = the one holding the longest "
                                      "prefix of the prompt unless it is much busier (SGLang's rule), least_loaded, "
                                      "round_robin")
    routing_cache_threshold: float = option(DEFAULT_CACHE_THRESHOLD, metavar="0..1",
                                            help="longest_prefix: the share of the prompt's KV blocks the "
                                                 "best-matching replica must hold for the request to go there; below "
                                                 "it the least loaded replica (SGLang router's --cache-threshold)")
    routing_prefill_weight: float = option(DEFAULT_PREFILL_WEIGHT, metavar=">=0",
                                           help="cache_aware: the weight of each prompt block a replica does not "
                                                "cache against each block of prefill queued there (Dynamo's KV "
                                                "router overlap weight); higher follows the cache more")
    prefill_replicas: int = option(0, help="disaggregated prefill and decode: replicas (Ray actors) that compute the "
                                           "prompts' KV, which moves to a --decode-replicas replica that samples and "
                                           "streams; chosen by --routing-policy; 0: each replica does both")
    decode_replicas: int = option(0, help="with --prefill-replicas: replicas that receive the prompts' KV and decode, "
                                          "chosen by load (least_loaded)")
    ray_address: str | None = option(None, help="the Ray cluster to run the replicas on; None: start a local one "
                                                "with as many CPUs as the replicas' threads")

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        if self.threads_per_replica < 1:
            raise ValueError(f"--threads-per-replica must be >= 1, got {self.threads_per_replica}")
        if self.routing_policy not in POLICIES:
            raise ValueError(f"--routing-policy must be one of {', '.join(POLICIES)}, got {self.routing_policy!r}")
        if not 0 <= self.routing_cache_threshold <= 1:
            raise ValueError(f"--routing-cache-threshold must be in [0, 1], got {self.routing_cache_threshold}")
        if self.routing_prefill_weight < 0:
            raise ValueError(f"--routing-prefill-weight must be >= 0, got {self.routing_prefill_weight}")
        if min(self.prefill_replicas, self.decode_replicas) < 0 or (self.prefill_replicas > 0) != (self.decode_replicas > 0):
            raise ValueError("--prefill-replicas and --decode-replicas go together, each >= 1 "
                             f"(got {self.prefill_replicas} and {self.decode_replicas})")
        if self.disaggregated and self.data_parallel_size > 1:
            raise ValueError("--data-parallel-size is for colocated replicas; with --prefill-replicas and "
                             "--decode-replicas leave it at 1")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0

    @property
    def uses_ray(self) -> bool:
        """Whether the engines run in Ray actors (more than one, or prefill and decode apart)."""
        return self.data_parallel_size > 1 or self.disaggregated
