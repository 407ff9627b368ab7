"""Needle retrieval under KV policies: ``infera eval --task passkey`` and ``--task niah``.

Passkey: each problem hides "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a
depth of a haystack of the standard library's ``pydoc_data/topics.py`` prose, cut to a total length
in tokens, and ends with "What is the pass key? The pass key is".  Multi-key NIAH (RULER's
``niah_multikey`` kind): ``--num-keys`` needles "The special magic number for KEY is: NNNNNNN.",
each with its own key (two words) and 7-digit number, the asked one at the depth and the others at
random depths; the question names one key.  The answer is right when the greedy continuation holds
the asked number's digits.  Every (length, depth, sample) problem runs under each KV policy of
``--kv-policies`` (``none``, or ``POLICY:BUDGET`` with BUDGET a fraction of the prompt or tokens,
e.g. ``snapkv:0.25``).  Per policy and length: accuracy, the KV bytes a sequence held when it
answered (measured: its block table at its last step; a prompt's chunk is computed before the
blocks beyond the budget go), and the wall time of the policy's batch.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import time
from dataclasses import asdict, dataclass

from infera.engine.llm_engine import LLMEngine
from infera.eval.perplexity import corpus
from infera.sampling_params import SamplingParams

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


NIAH_INTRO = ("Special magic numbers are hidden in the text below, each for its own key. Memorize them: you "
              "will be asked for one of them.\n\n")
NIAH_QUESTION = "\n\nWhat is the special magic number for {key}? The special magic number for {key} is:"
KEY_WORDS = (("amber", "brisk", "calm", "dusty", "eager", "frozen", "gentle", "hollow", "ivory", "jolly", "keen",
              "lunar", "misty", "noble", "olive", "proud", "quiet", "rusty", "silver", "tidy"),
             ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
              "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel"))


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def niah_needle(key: str, value: int) -> str:
    return f" The special magic number for {key} is: {value}. "


def problem(tokenizer, haystack: list[int], length: int, depth: float, key: int, offset: int) -> list[int]:
    """Token ids of one passkey problem: ``length`` tokens in all, the needle ``depth`` of the way in."""
    return hide(tokenizer, haystack, length, [(depth, needle(key))], offset, INTRO, QUESTION)


def hide(tokenizer, haystack: list[int], length: int, needles: list[tuple[float, str]], offset: int, intro: str,
         question: str) -> list[int]:
    """``intro``, haystack text with each ``(depth, text)`` needle inserted that far into it, and
    ``question``: ``length`` tokens in all."""
    intro_ids, question_ids = tokenizer.encode(intro), tokenizer.encode(question, add_special_tokens=False)
    hidden = [(depth, tokenizer.encode(text, add_special_tokens=False)) for depth, text in needles]
    fill = length - len(intro_ids) - len(question_ids) - sum(len(ids) for _, ids in hidden)
    if fill < 1:
        raise ValueError(f"needle task: length {length} is too short for the needles and the question")
    text = [haystack[(offset + i) % len(haystack)] for i in range(fill)]
    out, at = list(intro_ids), 0
    for depth, ids in sorted(hidden, key=lambda x: x[0]):
        cut = int(depth * fill)
        out += text[at:cut] + ids
        at = cut
    return out + text[at:] + question_ids


def parse_policy(spec: str) -> dict:
    """``none`` or ``POLICY:BUDGET`` -> SamplingParams fields."""
    name, _, budget = spec.partition(":")
    if name == "none":
        return {"kv_policy": "none"}
    if not budget:
        raise ValueError(f"passkey: policy {spec!r} needs a budget, e.g. {name}:0.25 or {name}:1024")
    value = float(budget)
    return {"kv_policy": name, "kv_budget": int(value) if value > 1 else value}


@dataclass
class Row:
    policy: str
    length: int
    problems: int
    accuracy: float
    kv_bytes: float  # mean over problems of the KV a sequence held when it answered (2-bit: staged rows too)
    kv_fraction: float  # kv_bytes / the full KV of the prompt and answer in the model's dtype
    seconds: float


def evaluate(engine: LLMEngine, policy: str, problems: dict[int, list[tuple[list[int], int]]],
             answer_tokens: int) -> list[Row]:
    fields = parse_policy(policy)
    kv_cache, bm = engine.runner.kv_cache, engine.block_manager
    rows = []
    for length, items in problems.items():
        params = SamplingParams(temperature=0.0, max_tokens=answer_tokens, **fields)
        started = time.perf_counter()
        ids = {engine.add_request(tokens, params): key for tokens, key in items}
        held = {rid: 0 for rid in ids}
        texts = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    texts[out.request_id] = out.outputs[0].text
            for seq in engine.scheduler.running:
                if seq.request_id in held:
                    held[seq.request_id] = kv_cache.held_bytes(bm.num_held_blocks(seq), bm.num_staged_slots(seq))
        seconds = time.perf_counter() - started
        right = sum(str(key) in texts[rid] for rid, key in ids.items())
        kv = sum(held.values()) / len(held)
        # (every layer's KV for every token: a block in each KV-cache group)
        full = bm.blocks_for(length + answer_tokens) * bm.num_kv_groups * kv_cache.model_bytes_per_block
        rows.append(Row(policy, length, len(items), right / len(items), kv, kv / full, seconds))
    return rows


def make_problems(tokenizer, lengths: list[int], depths: list[float], samples: int,
                  seed: int) -> dict[int, list[tuple[list[int], int]]]:
    """The problems of a run: per length, ``(token ids, key)`` for each depth and sample, the keys and
    haystack offsets drawn from ``random.Random(seed)`` (benchmarks/kvpress_peer.py asks the same)."""
    haystack = tokenizer.encode(corpus(), add_special_tokens=False)
    rng = random.Random(seed)
    problems = {n: [] for n in lengths}
    for n in lengths:
        for depth in depths:
            for _ in range(samples):
                key = rng.randrange(10000, 100000)
                problems[n].append((problem(tokenizer, haystack, n, depth, key, rng.randrange(len(haystack))), key))
    return problems


def make_niah_problems(tokenizer, lengths: list[int], depths: list[float], samples: int, seed: int,
                       num_keys: int) -> dict[int, list[tuple[list[int], int]]]:
    """Multi-key NIAH problems: per length, ``(token ids, asked number)`` for each depth and sample;
    ``num_keys`` distinct keys, the asked needle at the depth, the others at uniform random depths."""
    if not 1 <= num_keys <= len(KEY_WORDS[0]) * len(KEY_WORDS[1]):
        raise ValueError(f"niah: --num-keys must be in [1, {len(KEY_WORDS[0]) * len(KEY_WORDS[1])}], got {num_keys}")
    haystack = tokenizer.encode(corpus(), add_special_tokens=False)
    rng = random.Random(seed)
    keys = [f"{a}-{b}" for a in KEY_WORDS[0] for b in KEY_WORDS[1]]
    problems = {n: [] for n in lengths}
    for n in lengths:
        for depth in depths:
            for _ in range(samples):
                chosen = rng.sample(keys, num_keys)
                values = [rng.randrange(1_000_000, 10_000_000) for _ in chosen]
                needles = [(depth if i == 0 else rng.random(), niah_needle(k, v))
                           for i, (k, v) in enumerate(zip(chosen, values))]
                tokens = hide(tokenizer, haystack, n, needles, rng.randrange(len(haystack)), NIAH_INTRO,
                              NIAH_QUESTION.format(key=chosen[0]))
                problems[n].append((tokens, values[0]))
    return problems


def run(args: argparse.Namespace, engine_kwargs: dict) -> None:
    engine = LLMEngine(**dict(engine_kwargs, enable_prefix_caching=False))  # every policy computes its own KV
    lengths, depths = [int(n) for n in args.lengths.split(",")], [float(d) for d in args.depths.split(",")]
    if args.task == "niah":
        problems = make_niah_problems(engine.tokenizer, lengths, depths, args.samples, args.passkey_seed,
                                      args.num_keys)
    else:
        problems = make_problems(engine.tokenizer, lengths, depths, args.samples, args.passkey_seed)
    answer_tokens = args.answer_tokens or (12 if args.task == "niah" else 8)
    results: list[Row] = []
    for policy in args.kv_policies.split(","):
        for row in evaluate(engine, policy, problems, answer_tokens):
            results.append(row)
            if not args.json:
                print(f"{row.policy:>16} {row.length:>6} tokens: {args.task} {row.accuracy:6.1%} of {row.problems}  "
                      f"KV {row.kv_bytes / 2**20:7.1f} MiB ({row.kv_fraction:5.1%} of full)  {row.seconds:6.1f} s",
                      flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in results)
    if args.plot:
        plot(results, args.plot, "multi-key NIAH" if args.task == "niah" else "passkey")


def plot(rows: list[Row], path: str, task: str = "passkey") -> None:
    """Accuracy against KV bytes, one line per prompt length (points: the policies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for length in sorted({r.length for r in rows}):
        points = sorted((r.kv_bytes / 2**20, r.accuracy, r.policy) for r in rows if r.length == length)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{length} tokens")
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("KV held per sequence (MiB, log)")
    ax.set_ylabel(f"{task} accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.set_title(f"{task} retrieval against KV kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens (comma list)")
    g.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1] (comma list)")
    g.add_argument("--samples", type=int, default=2, help="problems (keys) per length and depth")
    g.add_argument("--kv-policies",
                   default="none,streaming:0.5,streaming:0.25,streaming:0.125,snapkv:0.5,snapkv:0.25,snapkv:0.125",
                   help="KV policies compared: none or POLICY:BUDGET (streaming or snapkv; BUDGET a fraction of the "
                        "prompt, or tokens)")
    g.add_argument("--answer-tokens", type=int, default=None,
                   help="tokens generated for the answer (default 8 for passkey's 5 digits, 12 for niah's 7)")
    g.add_argument("--csv", default=None, help="write the rows to this CSV file")
    g.add_argument("--plot", default=None, help="write accuracy against KV bytes to this PNG")
    g.add_argument("--passkey-seed", type=int, default=0, help="seed of the keys and haystack offsets")
    g.add_argument("--num-keys", type=int, default=4, help="niah: needles per problem, each with its own key")
