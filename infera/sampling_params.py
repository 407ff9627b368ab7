"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # biases are clamped to [-100, 100], as OpenAI's range
KV_POLICIES = ("none", "streaming", "snapkv")  # infera.engine.kv_policy
DEFAULT_SINK_TOKENS = 4


@dataclass
class StructuredOutputParams:
    """One output constraint (vLLM's names): a JSON schema, any JSON object, a regex,
    an EBNF grammar, a choice among strings, or an xgrammar structural tag (JSON text: a
    format of tags, free text and schemas, as tool calls and reasoning are constrained)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "grammar", "choice", "structural_tag") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of json, json_object, regex, grammar, choice, "
                             f"structural_tag; got {', '.join(given) or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")


@dataclass
class SamplingParams:
    """How to sample one request. Field names and defaults follow vLLM.

    ``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` disable those filters.
    ``seed`` makes the request reproducible whatever else runs in the batch.
    ``logit_bias`` adds to the logits of token ids (after penalties, before a grammar's mask, which
    wins); each bias is clamped to [-100, 100].
    ``max_tokens=0`` generates nothing: the prompt is only computed (and scored, with ``prompt_logprobs``).
    ``max_thinking_tokens``: a reasoning model that has thought (inside ``<think>``) for this many
    tokens gets ``</think>`` appended (budget forcing) and goes on to answer.
    ``kv_policy``, ``kv_budget``, ``kv_sink_tokens``: this request's KV policy (see
    :mod:`infera.engine.kv_policy`; None: the engine's ``--kv-policy`` settings).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    max_thinking_tokens: int | None = None
    kv_policy: str | None = None
    kv_budget: float | None = None
    kv_sink_tokens: int | None = None
    structured: StructuredOutputParams | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        _check(self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive integer", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0", self.repetition_penalty)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
               "max_tokens", "must be a non-negative integer", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                   name, f"must be an integer in [0, {MAX_LOGPROBS}]", value)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be non-negative integers", self.stop_token_ids)
        _check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63),
               "seed", "must be a 64-bit integer", self.seed)
        self.logit_bias = _clamped_bias(self.logit_bias)
        _check(self.max_thinking_tokens is None or (type(self.max_thinking_tokens) is int and self.max_thinking_tokens >= 1),
               "max_thinking_tokens", "must be a positive integer", self.max_thinking_tokens)
        check_kv_policy(self.kv_policy, self.kv_budget, self.kv_sink_tokens)
        _check(self.structured is None or isinstance(self.structured, StructuredOutputParams),
               "structured", "must be a StructuredOutputParams", self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _clamped_bias(bias: dict[int, float] | None) -> dict[int, float] | None:
    """``bias`` with every value clamped to [-100, 100]; None when empty.  ValueError names a bad entry."""
    if not bias:
        return None
    _check(isinstance(bias, dict), "logit_bias", "must map token ids to biases", type(bias).__name__)
    for token, value in bias.items():
        _check(type(token) is int and token >= 0, "logit_bias", "keys must be token ids (integers >= 0)", token)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
               "logit_bias", f"values must be finite numbers (token {token})", value)
    return {token: min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value))) for token, value in bias.items()}


def check_kv_policy(name: str | None, budget: float | None, sink_tokens: int | None) -> None:
    """ValueError naming the bad field of a KV policy's settings (None: the engine's default)."""
    _check(name is None or name in KV_POLICIES, "kv_policy", f"must be one of {', '.join(KV_POLICIES)}", name)
    number = not isinstance(budget, bool) and isinstance(budget, (int, float)) and math.isfinite(budget)
    _check(budget is None or (number and (0 < budget <= 1 or (budget > 1 and budget == int(budget)))),
           "kv_budget", "must be a token count (an integer > 1) or a fraction of the prompt in (0, 1]", budget)
    _check(sink_tokens is None or (type(sink_tokens) is int and sink_tokens >= 0),
           "kv_sink_tokens", "must be a non-negative integer", sink_tokens)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
