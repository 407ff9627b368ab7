"""Request traces: Mooncake JSONL, prompt tokens synthesized from its block hash ids, small
synthetic traces for tests.

A Mooncake request lists one hash id per 512-token block of its prompt; equal ids at the same
position mean an equal prefix up to there (the ids are prefix-consistent: an id always follows the
same one).  The simulated engine keeps its own block size (which must divide 512): every token of a
trace block is that block's hash id, so an engine block's content is ``(id,) * block_size`` and the
block manager's hash chain makes two prompts share exactly the engine blocks of their common
leading trace blocks (the last, partial trace block of each prompt included, up to the shorter).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TRACE_BLOCK = 512  # tokens per Mooncake hash id


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the trace's start
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]  # one per TRACE_BLOCK tokens of the prompt (the last one may be partial)

    def prompt_tokens(self) -> list[int]:
        """The synthesized prompt: each trace block's tokens all equal its hash id."""
        tokens: list[int] = []
        for i, h in enumerate(self.hash_ids):
            tokens += [h] * min(TRACE_BLOCK, self.input_length - i * TRACE_BLOCK)
        return tokens

    def route_hashes(self) -> list[int]:
        """Chain hashes of the prompt's trace blocks: what the router indexes."""
        out, prev = [], 0
        for h in self.hash_ids:
            prev = hash((prev, h))
            out.append(prev)
        return out


def read_mooncake(path: str | Path, limit: int | None = None, time_scale: float = 1.0) -> list[TraceRequest]:
    """The first ``limit`` requests of a Mooncake JSONL trace (``timestamp`` in ms), arrival times
    multiplied by ``time_scale`` (0.1: ten times as fast)."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    requests = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            r = json.loads(line)
            hash_ids = tuple(r["hash_ids"])
            if len(hash_ids) != -(-r["input_length"] // TRACE_BLOCK):
                raise ValueError(f"{path}: line {len(requests) + 1}: {len(hash_ids)} hash ids for "
                                 f"{r['input_length']} prompt tokens")
            requests.append(TraceRequest(r["timestamp"] / 1000 * time_scale, r["input_length"],
                                         r["output_length"], hash_ids))
    return requests


def trace_request(arrival: float, token_ids: Sequence[int], output_length: int, ids: dict[int, int]) -> TraceRequest:
    """The trace request of a real prompt (to record a run in Mooncake format): each 512-token block,
    the last one maybe partial, gets the id of its chain hash in ``ids`` (a new one if unseen), so
    equal prefixes get equal ids."""
    hash_ids, prev = [], 0
    for start in range(0, len(token_ids), TRACE_BLOCK):
        prev = hash((prev, tuple(token_ids[start:start + TRACE_BLOCK])))
        hash_ids.append(ids.setdefault(prev, len(ids)))
    return TraceRequest(arrival, len(token_ids), output_length, tuple(hash_ids))


def write_mooncake(requests: Iterable[TraceRequest], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps({"timestamp": round(r.arrival * 1000), "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")


def ideal_hit_rate(requests: Iterable[TraceRequest]) -> float:
    """Trace blocks found in an unbounded cache shared by all replicas, over all trace blocks."""
    seen: set[int] = set()
    hits = total = 0
    for r in requests:
        for h in r.route_hashes():
            hits += h in seen
            seen.add(h)
        total += len(r.hash_ids)
    return hits / total if total else 0.0


def shared_prefix_trace(num_prefixes: int, requests_per_prefix: int, prefix_blocks: int, suffix_tokens: int,
                        output_length: int, interval: float) -> list[TraceRequest]:
    """Requests arriving every ``interval`` seconds, cycling through ``num_prefixes`` distinct
    prefixes of ``prefix_blocks`` trace blocks, each followed by its own ``suffix_tokens``."""
    requests, next_id = [], num_prefixes * prefix_blocks
    for i in range(num_prefixes * requests_per_prefix):
        p = i % num_prefixes
        prefix = tuple(range(p * prefix_blocks, (p + 1) * prefix_blocks))
        suffix = tuple(range(next_id, next_id + -(-suffix_tokens // TRACE_BLOCK)))
        next_id += len(suffix)
        requests.append(TraceRequest(i * interval, prefix_blocks * TRACE_BLOCK + suffix_tokens, output_length,
                                     prefix + suffix))
    return requests
