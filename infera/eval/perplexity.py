"""Perplexity on fixed slices of the standard library's ``pydoc_data/topics.py`` text, with the
weight memory and single-stream decode speed of each weight format (``infera eval --task perplexity``).

The text is every help topic in key order; windows of ``window_len`` tokens start at evenly spaced
offsets, so every run scores the same tokens. Log-likelihoods come from the engine itself
(``prompt_logprobs``), through the same paged attention and chunked prefill as generation.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

from infera.engine.llm_engine import LLMEngine
from infera.sampling_params import SamplingParams

# eval rows: a dtype (unquantized or dequantized) or a quantization method
DTYPE_ROWS = ("float32", "bfloat16")


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(token_ids: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens at evenly spaced offsets over ``token_ids``."""
    if len(token_ids) < length:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than window_len {length}")
    span = len(token_ids) - length
    starts = [span * i // max(1, count - 1) for i in range(count)] if count > 1 else [0]
    return [token_ids[s:s + length] for s in starts]


def perplexity(engine: LLMEngine, num_windows: int = 4, window_len: int = 512) -> tuple[float, int]:
    """(perplexity, scored tokens) of the corpus windows; each window's first token is context only."""
    token_ids = engine.tokenizer.encode(corpus())
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    ids = [engine.add_request(w, params) for w in windows(token_ids, num_windows, min(window_len, engine.max_model_len - 1))]
    nll, count = 0.0, 0
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    for request_id in ids:
        scored = [lp for lp in outputs[request_id].prompt_logprobs[1:] if lp is not None]
        nll -= sum(lp.logprob for lp in scored)
        count += len(scored)
    return math.exp(nll / count), count


def decode_speed(engine: LLMEngine, new_tokens: int = 64) -> float:
    """Single-stream decode tokens per second after a short prompt (prefill excluded)."""
    engine.add_request("Write a short story about a robot who learns to paint.",
                       SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    first = end = None
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated = len(out.outputs[0].token_ids)
            now = time.perf_counter()
            if first is None:
                first, first_count = now, generated
            end = now
    return (generated - first_count) / (end - first) if end > first else float("nan")


@dataclass
class Row:
    method: str
    weight_mib: float
    perplexity: float
    tokens: int
    decode_tok_s: float


def evaluate(label: str, engine_kwargs: dict, num_windows: int, window_len: int, decode_tokens: int) -> Row:
    engine = LLMEngine(**dict(engine_kwargs, enable_prefix_caching=False))  # every window scored, no cache hit
    ppl, tokens = perplexity(engine, num_windows, window_len)
    speed = decode_speed(engine, decode_tokens) if decode_tokens else float("nan")
    return Row(label, engine.weight_bytes / 2**20, ppl, tokens, speed)


def row_kwargs(method: str, engine_kwargs: dict) -> dict:
    """Engine options of one row: a dtype (float, dequantized) or a quantization method."""
    if method in DTYPE_ROWS:
        return dict(engine_kwargs, dtype=method, quantization=None)
    return dict(engine_kwargs, quantization=method)


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--windows", type=int, default=4, help="text windows scored")
    g.add_argument("--window-len", type=int, default=512, help="tokens per window")
    g.add_argument("--decode-tokens", type=int, default=64, help="tokens generated to time decoding (0: skip)")


def run(args: argparse.Namespace, engine_kwargs: dict) -> None:
    if args.methods:
        rows = [(m, row_kwargs(m, engine_kwargs)) for m in args.methods.split(",")]
    else:
        rows = [(engine_kwargs.get("quantization") or engine_kwargs.get("dtype") or "auto", engine_kwargs)]
    results = []
    for label, kwargs in rows:
        row = evaluate(label, kwargs, args.windows, args.window_len, args.decode_tokens)
        results.append(row)
        if not args.json:
            print(f"{row.method:>14}  weights {row.weight_mib:7.1f} MiB  perplexity {row.perplexity:8.3f} "
                  f"({row.tokens} tokens)  decode {row.decode_tok_s:6.1f} tok/s", flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
