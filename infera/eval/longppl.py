"""Perplexity far into long windows under KV policies (``infera eval --task longppl``).

``--windows`` windows of ``--window-len`` tokens of the standard library's ``pydoc_data/topics.py``
text (at evenly spaced offsets, as ``--task perplexity``) are scored from position ``--score-from``
on (default: the second half), for each KV policy of ``--kv-policies`` (``none`` and ``streaming``
ones; the options of the perplexity and passkey tasks).  The prompt runs in the engine's chunks
(``--max-num-batched-tokens``): a ``streaming`` policy evicts between them, so the later chunks see
the sinks and the recent window only, as StreamingLLM's language-modelling evaluation; ``snapkv``
ranks blocks once the whole prompt is computed, so it does not change a prompt's own scores: its
rows are skipped.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from infera.engine.llm_engine import LLMEngine
from infera.eval.passkey import parse_policy
from infera.eval.perplexity import corpus, windows
from infera.sampling_params import SamplingParams


@dataclass
class Row:
    policy: str
    window_len: int
    score_from: int
    perplexity: float
    tokens: int
    vs_full: float  # perplexity / the first row's


def score(engine: LLMEngine, policy: str, texts: list[list[int]], score_from: int) -> tuple[float, int]:
    """(perplexity, scored tokens) of positions ``score_from`` on of each window."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, **parse_policy(policy))
    ids = [engine.add_request(w, params) for w in texts]
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    nll, count = 0.0, 0
    for request_id in ids:
        scored = [lp for lp in outputs[request_id].prompt_logprobs[score_from:] if lp is not None]
        nll -= sum(lp.logprob for lp in scored)
        count += len(scored)
    return math.exp(nll / count), count


def run(args: argparse.Namespace, engine_kwargs: dict) -> None:
    engine = LLMEngine(**dict(engine_kwargs, enable_prefix_caching=False))
    score_from = args.window_len // 2 if args.score_from is None else args.score_from
    if not 0 < score_from < args.window_len:
        raise ValueError(f"longppl: --score-from must be in (0, --window-len {args.window_len}), got {score_from}")
    texts = windows(engine.tokenizer.encode(corpus()), args.windows, args.window_len)
    rows: list[Row] = []
    for policy in args.kv_policies.split(","):
        if parse_policy(policy).get("kv_policy") not in ("none", "streaming"):
            print(f"{policy:>16}: skipped (it ranks blocks after the prompt: a prompt's scores are full KV's)")
            continue
        ppl, tokens = score(engine, policy, texts, score_from)
        rows.append(Row(policy, args.window_len, score_from, ppl, tokens, ppl / rows[0].perplexity if rows else 1.0))
        if not args.json:
            r = rows[-1]
            print(f"{r.policy:>16}: perplexity {r.perplexity:8.3f} at positions {r.score_from}-{r.window_len} "
                  f"({r.tokens} tokens, {r.vs_full:.3f}x the first row)", flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--score-from", type=int, default=None,
                   help="first scored position of each window (default: half of --window-len); --windows, "
                        "--window-len and --kv-policies as for the perplexity and passkey tasks")
