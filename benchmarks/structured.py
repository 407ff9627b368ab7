"""Structured-output benchmark: what a JSON schema or a regex costs on top of free generation.

On the bundled model (or ``--model``), in one run:
  * per-token mask time (filling the xgrammar bitmask + applying it to the logits), p50/p99 per
    sequence per token, at batch 1 and 32;
  * end-to-end output tok/s with a JSON schema and with a regex, jump-forward off and always on
    (the engine's default is on only in steps of at most JUMP_FORWARD_MAX_BATCH sequences), against
    unconstrained generation of exactly as many tokens per request (EOS ignored), at batch 1 and 32,
    with the engine steps taken and the share of engine time spent in structured-output code;
  * time to first token of a schema never seen before (compiled in the background) vs one cached
    vs no constraint;
  * the peer: HF transformers ``generate`` with xgrammar's own HF logits processor, same model and
    schema, batch 1, and the ratio.

    python benchmarks/structured.py                  # everything (a few minutes on a laptop CPU)
    python benchmarks/structured.py --no-peer --batch-sizes 1
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from infera import LLM, SamplingParams
from infera.sampling_params import StructuredOutputParams
from infera.structured import JUMP_FORWARD_MAX_BATCH
from infera.structured.bitmask import BatchBitmask

SCHEMA = {
    "type": "object", "required": ["name", "age", "email", "city", "skills", "level", "active"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18, "maximum": 90},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
        "city": {"type": "string"},
        "skills": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "level": {"enum": ["junior", "senior", "lead"]},
        "active": {"type": "boolean"},
    },
}
REGEX = r"Name: [A-Z][a-z]{1,12} [A-Z][a-z]{1,12}\nAge: [1-9][0-9]\nPhone: [0-9]{3}-[0-9]{3}-[0-9]{4}\n"
ROLES = ["teacher", "pilot", "chef", "nurse", "farmer", "painter", "lawyer", "baker"]
CITIES = ["Paris", "Lima", "Osaka", "Cairo", "Oslo", "Quito", "Perth", "Accra"]


@dataclass
class MaskTimer:
    """Wraps the engine's bitmask fill and apply (seconds per constrained row) and counts all
    the time the engine spends in structured-output code (fill, apply, matcher advance)."""

    fill: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    total: float = 0.0

    def install(self, llm: LLM) -> None:
        structured = llm.engine.structured
        fill, apply, on_token = structured.bitmask.fill, BatchBitmask.apply, structured.on_token

        def timed_fill(seqs, drafts=None):
            start = time.perf_counter()
            out = fill(seqs, drafts)
            dt = time.perf_counter() - start
            rows = sum(s.grammar_state is not None for s in seqs)
            if rows:
                self.fill.append(dt / rows)
            self.total += dt
            return out

        def timed_apply(mask, logits):
            start = time.perf_counter()
            apply(mask, logits)
            dt = time.perf_counter() - start
            self.apply.append(dt / max(1, len(mask.rows)))
            self.total += dt

        def timed_on_token(seq, last=True):
            start = time.perf_counter()
            out = on_token(seq, last)
            self.total += time.perf_counter() - start
            return out

        structured.bitmask.fill = timed_fill
        structured.on_token = timed_on_token
        BatchBitmask.apply = timed_apply

    def take(self) -> tuple[list[float], list[float], float]:
        out = self.fill, self.apply, self.total
        self.fill, self.apply, self.total = [], [], 0.0
        return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def prompts(llm: LLM, kind: str, n: int) -> list[list[int]]:
    what = "as JSON" if kind == "json" else "as a card with Name, Age and Phone lines"
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content":
            f"Describe a {ROLES[i % 8]} from {CITIES[i // 8 % 8]} (person number {i}) {what}."}])
            for i in range(n)]


def constraint(kind: str) -> StructuredOutputParams:
    return StructuredOutputParams(json=SCHEMA) if kind == "json" else StructuredOutputParams(regex=REGEX)


@dataclass
class Cost:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process (all threads): steadier than wall time on a shared machine
    steps: int  # engine steps, i.e. forward passes


def timed(llm: LLM, batch: list[list[int]], params: list[SamplingParams]) -> tuple[Cost, list]:
    engine = llm.engine
    steps = 0
    while engine.has_unfinished_requests():  # nothing left over from before
        engine.step()
    engine.reset_prefix_cache()  # every run prefills its prompts: the first would otherwise pay for all
    wall, cpu = time.perf_counter(), time.process_time()
    ids = [engine.add_request(p, sp) for p, sp in zip(batch, params)]
    done = {}
    while engine.has_unfinished_requests():
        steps += 1
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return Cost(time.perf_counter() - wall, time.process_time() - cpu, steps), [done[i] for i in ids]


def throughput(llm: LLM, timer: MaskTimer, kind: str, batch_size: int, max_tokens: int, rounds: int) -> dict:
    """Constrained (jump-forward off, on) and free runs, interleaved ``rounds`` times; medians."""
    batch = prompts(llm, kind, batch_size)
    structured = llm.engine.structured
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, structured=constraint(kind))] * batch_size
    llm.generate(batch[:1], params[:1], use_tqdm=False)  # compiled and cached before timing
    costs: dict[str, list[Cost]] = {"plain": [], "jf": [], "free": []}
    tokens: dict[str, int] = {}
    row: dict = {"workload": kind, "batch": batch_size}
    fill: list[float] = []
    apply: list[float] = []
    forced, free = 0, []
    shares: dict[str, list[float]] = {"plain": [], "jf": []}
    for _ in range(rounds):
        for tag in ("plain", "jf"):
            structured.jump_forward_max_batch = batch_size if tag == "jf" else 0  # always / never
            timer.take()
            before = structured.num_forced_tokens
            cost, outs = timed(llm, batch, params)
            costs[tag].append(cost)
            tokens[tag] = sum(len(o.outputs[0].token_ids) for o in outs)
            row[f"{tag}_valid"] = f"{sum(is_valid(kind, o.outputs[0]) for o in outs)}/{len(outs)}"
            f, a, total = timer.take()
            shares[tag].append(total / cost.wall)
            if tag == "plain":
                fill += f
                apply += a
                free = [SamplingParams(temperature=0, max_tokens=len(o.outputs[0].token_ids), ignore_eos=True)
                        for o in outs]
            else:
                forced = structured.num_forced_tokens - before
        costs["free"].append(timed(llm, batch, free)[0])
    tokens["free"] = tokens["plain"]
    for tag, values in costs.items():
        row[f"{tag}_tok_s"] = tokens[tag] / statistics.median(c.wall for c in values)
        row[f"{tag}_tok_cpu_s"] = tokens[tag] / statistics.median(c.cpu for c in values)
        row[f"{tag}_steps"] = values[0].steps
        if tag in shares:
            row[f"{tag}_structured_share"] = statistics.median(shares[tag])
    row["tokens_per_request"] = tokens["plain"] / batch_size
    row["forced_share"] = forced / tokens["jf"]
    row["mask_fill_p50_us"], row["mask_fill_p99_us"] = pct(fill, 0.5) * 1e6, pct(fill, 0.99) * 1e6
    row["mask_apply_p50_us"], row["mask_apply_p99_us"] = pct(apply, 0.5) * 1e6, pct(apply, 0.99) * 1e6
    return row


def is_valid(kind: str, completion) -> bool:
    if completion.finish_reason != "stop":
        return False
    if kind == "regex":
        return re.fullmatch(REGEX, completion.text) is not None
    try:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def ttft(llm: LLM, structured: StructuredOutputParams | None) -> float:
    engine = llm.engine
    prompt = prompts(llm, "json", 1)[0]
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, structured=structured))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def peer_hf(llm: LLM, max_tokens: int, rounds: int) -> dict | None:
    """HF transformers generate, constrained by xgrammar's HF logits processor, batch 1."""
    import torch
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM
    from xgrammar.contrib.hf import LogitsProcessor

    path = Path(llm.engine.model_path)
    try:  # float32: transformers' fastest CPU path for a GGUF file (it keeps the weights packed)
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is skipped
        print(f"HF transformers peer skipped: {e}")
        return None
    model.eval()
    tokenizer = llm.tokenizer.hf
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    prompt = torch.tensor([prompts(llm, "json", 1)[0]])
    out: dict = {}
    with torch.inference_mode():
        for name in ("json", "free"):
            tokens, start, cpu = 0, time.perf_counter(), time.process_time()
            for _ in range(rounds):
                if name == "json":
                    extra = dict(logits_processor=[LogitsProcessor(compiled)], max_new_tokens=max_tokens)
                else:  # as many tokens as the constrained run made
                    extra = dict(min_new_tokens=out["json_tokens"], max_new_tokens=out["json_tokens"])
                gen = model.generate(prompt, do_sample=False, pad_token_id=tokenizer.eos_token_id, **extra)
                tokens += gen.shape[1] - prompt.shape[1]
                if name == "json":
                    out["json_tokens"] = gen.shape[1] - prompt.shape[1]
            out[f"{name}_tok_s"] = tokens / (time.perf_counter() - start)
            out[f"{name}_tok_cpu_s"] = tokens / (time.process_time() - cpu)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each run (medians are reported)")
    ap.add_argument("--no-peer", action="store_true", help="skip HF transformers + xgrammar")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice); 1 gives steadier CPU-time figures on a busy machine")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    llm = LLM(args.model, dtype=args.dtype)
    print(f"model {llm.engine.model_path} ({llm.engine.dtype}, {llm.engine.device})")
    timer = MaskTimer()
    timer.install(llm)
    llm.generate(prompts(llm, "json", 2), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up

    rows = []
    for kind in ("json", "regex"):
        for b in args.batch_sizes:
            row = throughput(llm, timer, kind, b, args.max_tokens, args.rounds)
            rows.append(row)
            print(f"{kind} batch {b}: {row['tokens_per_request']:.0f} tokens/request", flush=True)
            for tag, name in (("free", "free"), ("plain", "constrained"), ("jf", "+ jump-forward")):  # jf: always on
                wall, cpu = row[f"{tag}_tok_s"] / row["free_tok_s"], row[f"{tag}_tok_cpu_s"] / row["free_tok_cpu_s"]
                ratio = "" if tag == "free" else (
                    f" = {wall:.2f}x / {cpu:.2f}x"
                    f" of free, valid {row[f'{tag}_valid']}, {row[f'{tag}_structured_share']:.1%} of the time in "
                    f"structured-output code")
                print(f"  {name:15s} {row[f'{tag}_tok_s']:6.1f} tok/s wall, {row[f'{tag}_tok_cpu_s']:6.1f} tok/CPU-s, "
                      f"{row[f'{tag}_steps']:3d} steps{ratio}")
            print(f"  {row['forced_share']:.0%} of tokens forced (jump-forward); mask per sequence per token: "
                  f"fill p50 {row['mask_fill_p50_us']:.0f} us p99 {row['mask_fill_p99_us']:.0f} us, "
                  f"apply p50 {row['mask_apply_p50_us']:.0f} us p99 {row['mask_apply_p99_us']:.0f} us", flush=True)

    llm.engine.structured.jump_forward_max_batch = JUMP_FORWARD_MAX_BATCH
    def fresh() -> StructuredOutputParams:  # a schema the compile cache has not seen
        extra = {f"id_{uuid.uuid4().hex[:8]}": {"type": "integer"}}
        return StructuredOutputParams(json=dict(SCHEMA, properties=dict(SCHEMA["properties"], **extra)))

    start = time.perf_counter()
    llm.engine.structured.grammar_for(SamplingParams(structured=fresh())).result()
    compile_s = time.perf_counter() - start
    new = fresh()
    times = {"free": ttft(llm, None), "new schema": ttft(llm, new), "cached schema": ttft(llm, new)}
    print("time to first token: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
          + f" (validating + compiling a new schema alone: {compile_s * 1e3:.0f} ms)")

    peer = None
    if not args.no_peer:
        json1 = next(r for r in rows if r["workload"] == "json" and r["batch"] == 1) if 1 in args.batch_sizes else None
        peer = peer_hf(llm, args.max_tokens, args.rounds)
        if peer:
            line = (f"peer HF transformers + xgrammar logits processor, batch 1: json {peer['json_tok_s']:.1f} tok/s "
                    f"wall, {peer['json_tok_cpu_s']:.1f} tok/CPU-s; free {peer['free_tok_s']:.1f} tok/s wall, "
                    f"{peer['free_tok_cpu_s']:.1f} tok/CPU-s")
            if json1:
                line += (f"; infera/HF with the schema: {json1['plain_tok_s'] / peer['json_tok_s']:.2f}x wall, "
                         f"{json1['plain_tok_cpu_s'] / peer['json_tok_cpu_s']:.2f}x CPU "
                         f"(with jump-forward {json1['jf_tok_s'] / peer['json_tok_s']:.2f}x, "
                         f"{json1['jf_tok_cpu_s'] / peer['json_tok_cpu_s']:.2f}x)")
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "ttft_s": times, "compile_s": compile_s, "peer_hf": peer}, f, indent=2)


if __name__ == "__main__":
    main()
