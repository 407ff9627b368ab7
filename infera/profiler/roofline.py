"""Roofline model of one engine step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3).

For every operator infera runs, count FLOPs and the bytes it must move at least once (weights,
activations, KV cache), then predict its time on a :class:`HardwareSpec` as
``max(flops / peak_flops, bytes / bandwidth)``: whichever roof is lower binds it. Matmuls use the
compute dtype's peak; element-wise operators use the fp32 (non-tensor) peak. Attention is counted
as one fused kernel: causal score pairs only, K/V read once per KV head (GQA), scores kept on chip.
Operators run one after another, so the step's predicted time is the sum of theirs.

A step is a flat batch like the model runner's: per sequence, the tokens computed now and the
context length after them. Logits are computed only for the rows that sample (the last token of a
sequence that reaches its end), as infera does.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from infera.models.llama import head_dim_of
from infera.profiler.hardware import HardwareSpec

# ---- formats --------------------------------------------------------------------------------

SCALE_BITS = 16  # our int8/int4 quantizers keep one 16-bit scale per row or group
KV_SCALE_BYTES = 4  # int8 KV cache: one float32 scale per token and KV head
FLOAT_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
DTYPE_BYTES = {name: bits // 8 for name, bits in FLOAT_BITS.items()}
QUANTIZATIONS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "int8", "int4"]
KV_DTYPES = ["float32", "bfloat16", "float16", "int8"]


@dataclass(frozen=True)
class WeightFormat:
    """Storage of a weight matrix: ``bits`` per weight (GGUF block scales included), plus one
    ``scale_bits`` scale per ``group_size`` weights of a row (``None``: one per row)."""

    name: str
    bits: float
    scale_bits: int = 0
    group_size: int | None = None

    def nbytes(self, rows: int, cols: int) -> float:
        total = rows * cols * self.bits
        if self.scale_bits:
            total += rows * (math.ceil(cols / self.group_size) if self.group_size else 1) * self.scale_bits
        return total / 8

    def bits_per_weight(self, cols: int) -> float:
        return 8 * self.nbytes(1, cols) / cols


def gguf_format(type_name: str) -> WeightFormat:
    """The format of a GGUF tensor type (``Q4_1``, ``Q6_K``, ``F16``...), sized from the gguf package."""
    import gguf

    upper = type_name.upper()
    if upper in ("F32", "F16", "BF16"):
        return weight_format({"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[upper])
    try:
        qtype = gguf.GGMLQuantizationType[upper]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {type_name!r}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return WeightFormat(type_name.lower(), type_size * 8 / block)


def weight_format(name: str, group_size: int = 128) -> WeightFormat:
    """``float32``/``bfloat16``/``float16``; ``int8`` (per output channel); ``int4`` (groups of
    ``group_size`` input weights); or a GGUF type (``q4_0``, ``q4_1``, ``q8_0``, ``q4_k``, ``q6_k``...)."""
    key = name.lower()
    if key in FLOAT_BITS:
        return WeightFormat(key, FLOAT_BITS[key])
    if key == "int8":
        return WeightFormat("int8", 8, SCALE_BITS)
    if key == "int4":
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        return WeightFormat(f"int4-g{group_size}", 4, SCALE_BITS, group_size)
    try:
        return gguf_format(key)
    except ValueError:
        raise ValueError(f"unknown weight format {name!r}; choose from float32, bfloat16, "
                         f"{', '.join(QUANTIZATIONS)}") from None


def kv_element_bytes(kv_dtype: str, head_dim: int) -> float:
    """Bytes per cached K or V element, scales included."""
    if kv_dtype == "int8":
        return 1 + KV_SCALE_BYTES / head_dim
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
    return DTYPE_BYTES[kv_dtype]


# ---- model shape and weights ------------------------------------------------------------------

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {  # published HF configs, shapes only
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def builtin_config(name: str) -> PretrainedConfig:
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in config {name!r}; choose from {', '.join(BUILTIN_CONFIGS)}")
    spec = dict(BUILTIN_CONFIGS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2

    @classmethod
    def from_config(cls, config: PretrainedConfig, name: str = "") -> ModelShape:
        if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
            raise ValueError(f"the roofline models dense decoders; {config.model_type} is a mixture of experts")
        return cls(name or config.model_type, config.hidden_size, config.intermediate_size,
                   config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads, head_dim_of(config),
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)),
                   config.model_type == "qwen3",
                   bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2")

    def matrices(self, name: str) -> list[tuple[int, int]]:
        """(rows, cols) of the checkpoint matrices behind a fused weight name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        return {"embed_tokens": [(self.vocab_size, h)], "lm_head": [(self.vocab_size, h)],
                "qkv_proj": [(q, h), (kv, h), (kv, h)], "o_proj": [(h, q)],
                "gate_up_proj": [(i, h), (i, h)], "down_proj": [(h, i)]}[name]

    @property
    def num_parameters(self) -> int:
        names = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = sum(r * c for n in names for r, c in self.matrices(n)) + norms
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        embed = self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size


@dataclass(frozen=True)
class WeightLayout:
    """Bytes of every weight matrix the model reads: ``matrix_bytes(name, layer)`` for the fused
    names of :meth:`ModelShape.matrices` (``layer`` is None for ``embed_tokens`` and ``lm_head``)."""

    description: str
    matrix_bytes: Callable[[str, int | None], float]

    @classmethod
    def uniform(cls, shape: ModelShape, fmt: WeightFormat) -> WeightLayout:
        return cls(fmt.name, lambda name, layer: sum(fmt.nbytes(r, c) for r, c in shape.matrices(name)))

    @classmethod
    def from_gguf(cls, gguf_file: Any, shape: ModelShape) -> WeightLayout:
        """The exact tensor sizes of a GGUF file (a :class:`~infera.loader.gguf_file.GGUFFile`)."""
        tensors = gguf_file.tensors
        parts = {"qkv_proj": ["attn_q", "attn_k", "attn_v"], "o_proj": ["attn_output"],
                 "gate_up_proj": ["ffn_gate", "ffn_up"], "down_proj": ["ffn_down"]}
        lm_head = "output.weight" if "output.weight" in tensors else "token_embd.weight"

        def names(name: str, layer: int | None) -> list[str]:
            if name == "embed_tokens":
                return ["token_embd.weight"]
            if name == "lm_head":
                return [lm_head]
            return [f"blk.{layer}.{p}.weight" for p in parts[name]]

        def matrix_bytes(name: str, layer: int | None) -> float:
            return float(sum(int(tensors[n].n_bytes) for n in names(name, layer)))

        types = Counter(tensors[n].tensor_type.name.lower() for layer in range(shape.num_layers)
                        for p in parts for n in names(p, layer))
        embed = tensors["token_embd.weight"].tensor_type.name.lower()
        head = tensors[lm_head].tensor_type.name.lower()
        description = "/".join(t for t, _ in types.most_common()) + f" (embedding {embed}" + (
            ", tied lm_head)" if lm_head == "token_embd.weight" else f", lm_head {head})")
        return cls(description, matrix_bytes)


def resolve_model(model: str | None, config_name: str | None, dtype: str, quantization: str | None = None,
                  group_size: int = 128) -> tuple[ModelShape, WeightLayout]:
    """The shape of a built-in config (``config_name``) or of a model file (GGUF, HF directory,
    default: the bundled one; no weights are read), and its weight layout: ``quantization`` if
    given (``none``: weights in ``dtype``), else a GGUF's own tensor types, else ``dtype``."""
    from infera.loader.gguf_file import GGUFFile
    from infera.loader.model_loader import open_model

    source = None
    if config_name:
        shape = ModelShape.from_config(builtin_config(config_name), config_name)
    else:
        source = open_model(model)
        shape = ModelShape.from_config(source.config(), source.path.name)
    if quantization and quantization != "none":
        return shape, WeightLayout.uniform(shape, weight_format(quantization, group_size))
    if quantization is None and isinstance(source, GGUFFile):
        return shape, WeightLayout.from_gguf(source, shape)
    return shape, WeightLayout.uniform(shape, weight_format(dtype))


# ---- steps and operators --------------------------------------------------------------------

@dataclass(frozen=True)
class StepShape:
    """One engine step: per sequence ``(new tokens, context length after the step)``, and how
    many rows get logits."""

    queries: tuple[tuple[int, int], ...]
    num_logits: int

    @property
    def num_tokens(self) -> int:
        return sum(n for n, _ in self.queries)

    @property
    def num_seqs(self) -> int:
        return len(self.queries)


def prefill_step(batch: int, prompt_len: int) -> StepShape:
    """``batch`` whole prompts of ``prompt_len`` tokens, logits for each one's last token."""
    return StepShape(((prompt_len, prompt_len),) * batch, batch)


def decode_step(batch: int, context: int) -> StepShape:
    """One new token for each of ``batch`` sequences whose context reaches ``context`` tokens."""
    return StepShape(((1, context),) * batch, batch)


@dataclass
class Operator:
    """FLOPs and bytes of one operator (summed over ``count`` instances), and its prediction."""

    name: str
    group: str  # the operator type infera's profile measures it under
    kind: str  # "matmul" (compute-dtype peak) or "vector" (fp32 peak)
    flops: float = 0.0
    weight_bytes: float = 0.0
    act_read: float = 0.0
    act_write: float = 0.0
    kv_read: float = 0.0
    kv_write: float = 0.0
    count: int = 1
    time_s: float = 0.0
    bound: str = ""

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_read + self.act_write + self.kv_read + self.kv_write

    @property
    def intensity(self) -> float:
        """FLOP per byte moved (inf for an operator that moves nothing)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def predict(self, hw: HardwareSpec, dtype: str) -> None:
        compute = self.flops / hw.peak_flops(dtype if self.kind == "matmul" else "fp32")
        memory = self.bytes / hw.memory_bandwidth
        self.time_s = max(compute, memory)
        self.bound = "compute" if compute > memory else "memory"

    def merge(self, other: Operator) -> None:
        for f in ("flops", "weight_bytes", "act_read", "act_write", "kv_read", "kv_write", "count"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "kind": self.kind, "count": self.count,
                "flops": self.flops, "bytes": self.bytes, "weight_bytes": self.weight_bytes,
                "act_read_bytes": self.act_read, "act_write_bytes": self.act_write,
                "kv_read_bytes": self.kv_read, "kv_write_bytes": self.kv_write,
                "intensity": self.intensity if math.isfinite(self.intensity) else None,
                "bound": self.bound, "predicted_s": self.time_s}


def _norm(name: str, rows: int, width: int, act: int, residual: bool, group: str = "rmsnorm") -> Operator:
    """RMSNorm (optionally fused with the residual add): add, square, sum, scale, weight."""
    k = 2 if residual else 1
    return Operator(name, group, "vector", flops=rows * width * (5 if residual else 4), weight_bytes=width * act,
                    act_read=k * rows * width * act, act_write=k * rows * width * act)


def _linear(name: str, rows: int, cols_in: int, cols_out: int, weight_bytes: float, act: int,
            bias: bool = False) -> Operator:
    return Operator(name, name, "matmul", flops=2 * rows * cols_in * cols_out + (rows * cols_out if bias else 0),
                    weight_bytes=weight_bytes + (cols_out * act if bias else 0),
                    act_read=rows * cols_in * act, act_write=rows * cols_out * act)


def layer_operators(shape: ModelShape, step: StepShape, layout: WeightLayout, layer: int,
                    dtype: str, kv_dtype: str) -> list[Operator]:
    """The operators of decoder layer ``layer`` (layer 0's input norm has no residual to add)."""
    t, h, inter, d = step.num_tokens, shape.hidden_size, shape.intermediate_size, shape.head_dim
    hq, hkv = shape.num_heads, shape.num_kv_heads
    q, kv = hq * d, hkv * d
    a, kvb = DTYPE_BYTES[dtype], kv_element_bytes(kv_dtype, d)
    w = lambda name: layout.matrix_bytes(name, layer)  # noqa: E731
    ops = [_norm("input_layernorm", t, h, a, residual=layer > 0),
           _linear("qkv_proj", t, h, q + 2 * kv, w("qkv_proj"), a, bias=shape.qkv_bias)]
    if shape.qk_norm:
        qk_norm = _norm("qk_norm", t * (hq + hkv), d, a, residual=False, group="qk_norm")
        qk_norm.weight_bytes *= 2  # a q_norm and a k_norm weight
        ops.append(qk_norm)
    ops.append(Operator("rope", "rope", "vector", flops=3 * t * (q + kv), act_read=t * (q + kv) * a + t * d * a,
                        act_write=t * (q + kv) * a))
    ops.append(Operator("kv_cache_write", "attention", "vector", act_read=2 * t * kv * a, kv_write=2 * t * kv * kvb))
    scores = Operator("attn_scores", "attention", "matmul")
    softmax = Operator("attn_softmax", "attention", "vector")
    weighted = Operator("attn_weighted_sum", "attention", "matmul")
    for n, c in step.queries:
        pairs = n * c - n * (n - 1) // 2  # causal (query, key) pairs of this chunk
        fresh = n == c  # a whole prompt attends to its fresh K/V; otherwise K/V come from the cache
        kv_bytes = c * kv * (a if fresh else kvb)
        scores.flops += 2 * pairs * hq * d
        scores.act_read += n * q * a + (kv_bytes if fresh else 0)
        scores.kv_read += 0 if fresh else kv_bytes
        softmax.flops += 5 * pairs * hq  # max, subtract, exp, sum, divide; on chip
        weighted.flops += 2 * pairs * hq * d
        weighted.act_read += kv_bytes if fresh else 0
        weighted.kv_read += 0 if fresh else kv_bytes
        weighted.act_write += n * q * a
    ops += [scores, softmax, weighted,
            _linear("o_proj", t, q, h, w("o_proj"), a),
            _norm("post_attention_layernorm", t, h, a, residual=True),
            _linear("gate_up_proj", t, h, 2 * inter, w("gate_up_proj"), a),
            Operator("silu_mul", "silu_mul", "vector", flops=5 * t * inter, act_read=2 * t * inter * a,
                     act_write=t * inter * a),
            _linear("down_proj", t, inter, h, w("down_proj"), a)]
    return ops


def model_operators(shape: ModelShape, step: StepShape, layout: WeightLayout, dtype: str,
                    kv_dtype: str) -> list[Operator]:
    """Every operator of the forward pass, same-named ones summed over layers."""
    t, h, v, a = step.num_tokens, shape.hidden_size, shape.vocab_size, DTYPE_BYTES[dtype]
    embedding = Operator("embedding", "embedding", "vector",
                         weight_bytes=layout.matrix_bytes("embed_tokens", None) * min(t, v) / v,
                         act_read=8 * t, act_write=t * h * a)  # gathers t rows; int64 ids
    merged: dict[str, Operator] = {"embedding": embedding}
    for layer in range(shape.num_layers):
        for op in layer_operators(shape, step, layout, layer, dtype, kv_dtype):
            if op.name in merged:
                merged[op.name].merge(op)
            else:
                merged[op.name] = op
    rows = step.num_logits
    merged["final_norm"] = _norm("final_norm", t, h, a, residual=True, group="final_norm")
    merged["lm_head"] = _linear("lm_head", rows, h, v, layout.matrix_bytes("lm_head", None) if rows else 0, a)
    return list(merged.values())


# ---- reports --------------------------------------------------------------------------------

@dataclass
class RooflineReport:
    model: str
    hardware: str
    phase: str
    batch: int
    context: int
    dtype: str
    weights: str
    kv_cache_dtype: str
    tokens: int  # tokens the step computes: prompt tokens (prefill) or new tokens (decode)
    parameters: int
    operators: list[Operator]
    layer: list[Operator] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return sum(op.flops for op in self.operators)

    @property
    def total_bytes(self) -> float:
        return sum(op.bytes for op in self.operators)

    @property
    def predicted_s(self) -> float:
        return sum(op.time_s for op in self.operators)

    @property
    def bound(self) -> str:
        """The bound of the operators that take most of the predicted time."""
        memory = sum(op.time_s for op in self.operators if op.bound == "memory")
        return "memory" if memory >= self.predicted_s - memory else "compute"

    @property
    def tok_s_ceiling(self) -> float:
        return self.tokens / self.predicted_s if self.predicted_s else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hardware": self.hardware, "phase": self.phase, "batch": self.batch,
                "context": self.context, "dtype": self.dtype, "weights": self.weights,
                "kv_cache_dtype": self.kv_cache_dtype, "tokens": self.tokens, "parameters": self.parameters,
                "total_flops": self.total_flops, "total_bytes": self.total_bytes, "bound": self.bound,
                "predicted_s": self.predicted_s, "tok_s_ceiling": self.tok_s_ceiling,
                "operators": [op.to_dict() for op in self.operators],
                "layer": [op.to_dict() for op in self.layer]}

    def table(self) -> str:
        """The per-operator tables (one decoder layer, then the whole model) and the totals."""
        what = "prompt" if self.phase == "prefill" else "generated"
        head = (f"{self.model} ({self.parameters / 1e6:,.0f}M parameters) on {self.hardware}: {self.phase}, "
                f"batch {self.batch}, context {self.context}, {self.dtype} compute, weights {self.weights}, "
                f"KV cache {self.kv_cache_dtype}")
        total = (f"total: {self.total_flops / 1e9:,.3f} GFLOP, {self.total_bytes / 1e6:,.2f} MB, intensity "
                 f"{self.total_flops / self.total_bytes:.1f} FLOP/B, {self.bound}-bound, predicted "
                 f"{self.predicted_s * 1e3:.3f} ms per step -> ceiling {self.tok_s_ceiling:,.0f} {what} tok/s")
        parts = [head]
        if self.layer:
            parts += ["", "one decoder layer:", format_operators(self.layer)]
        parts += ["", "whole model (per step):", format_operators(self.operators, self.predicted_s), "", total]
        return "\n".join(parts)


def format_operators(ops: list[Operator], total_s: float | None = None) -> str:
    cols = ["operator", "n", "GFLOP", "weight MB", "act rd MB", "act wr MB", "KV rd MB", "KV wr MB",
            "FLOP/B", "bound", "time us"] + (["share"] if total_s else [])
    rows = []
    for op in ops:
        row = [op.name, str(op.count), f"{op.flops / 1e9:.4f}", f"{op.weight_bytes / 1e6:.3f}",
               f"{op.act_read / 1e6:.3f}", f"{op.act_write / 1e6:.3f}", f"{op.kv_read / 1e6:.3f}",
               f"{op.kv_write / 1e6:.3f}", "-" if not math.isfinite(op.intensity) else f"{op.intensity:.1f}",
               op.bound, f"{op.time_s * 1e6:.1f}"]
        if total_s:
            row.append(f"{100 * op.time_s / total_s:.1f}%")
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(cols), *map(fmt, rows)])


def analyze(shape: ModelShape, step: StepShape, hw: HardwareSpec, dtype: str, layout: WeightLayout,
            kv_dtype: str | None = None, phase: str = "step", batch: int | None = None,
            context: int | None = None) -> RooflineReport:
    """Count and predict every operator of ``step`` on ``hw``."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    kv_dtype = kv_dtype or dtype
    ops = model_operators(shape, step, layout, dtype, kv_dtype)
    layer = layer_operators(shape, step, layout, min(1, shape.num_layers - 1), dtype, kv_dtype)
    for op in (*ops, *layer):
        op.predict(hw, dtype)
    context = context if context is not None else max((c for _, c in step.queries), default=0)
    return RooflineReport(shape.name, hw.name, phase, batch if batch is not None else step.num_seqs, context,
                          dtype, layout.description, kv_dtype, step.num_tokens, shape.num_parameters, ops, layer)


def phase_report(shape: ModelShape, phase: str, batch: int, context: int, hw: HardwareSpec, dtype: str,
                 layout: WeightLayout, kv_dtype: str | None = None) -> RooflineReport:
    """``prefill``: ``batch`` prompts of ``context`` tokens; ``decode``: one token for ``batch``
    sequences at context ``context``."""
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got batch {batch}, context {context}")
    if phase == "prefill":
        step = prefill_step(batch, context)
    elif phase == "decode":
        step = decode_step(batch, context)
    else:
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")
    return analyze(shape, step, hw, dtype, layout, kv_dtype, phase, batch, context)
