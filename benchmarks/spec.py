"""Speculative decoding: decode tok/s with each proposer against plain decoding, in one run.

Tasks: (a) input-grounded (rewrite or summarize a given passage, edit a given code file: passages
from the pydoc topics, code from the standard library), (b) code editing (rewrite a given function
with a small change) and (c) open chat.  Each task set runs
single-stream (one request at a time) and as a batch of 16, greedy, stopping at EOS (the outputs
of every configuration must be the same tokens: speculation is lossless).  Decode tok/s counts the
tokens generated after each request's first token.  Peer: llama.cpp (llama-cpp-python) single
stream on the same prompts and output lengths, plain and with its prompt-lookup decoding.  Every
measurement runs ``--repeats`` times, interleaved across configurations; the best run counts.

    python benchmarks/spec.py [--quick] [--methods ngram,recycle,self] [--draft PATH] [--repeats N] [--json FILE]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infera  # noqa: E402,F401  (before torch: it sets the OpenMP spin count)

from benchmarks.common import have, machine, save_json  # noqa: E402
from infera import LLM, SamplingParams  # noqa: E402
from infera.loader.model_loader import default_model_path  # noqa: E402
from infera.loader.model_store import resolve  # noqa: E402

TOPICS = ["assert", "break", "del", "pass", "return", "while", "global", "import", "raise", "with",
          "for", "if", "try", "lambda", "continue", "yield"]
OPEN_CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some good habits for staying healthy while working from home?",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me ideas for a birthday party for my grandmother.",
    "Describe your ideal weekend in the mountains.",
    "What should I consider when adopting a dog?",
    "Write a poem about autumn leaves.",
    "How do I start learning to play the guitar?",
    "Tell me about the history of tea.",
    "What are the pros and cons of electric cars?",
    "Suggest a plan for a three-day trip to Rome.",
    "How can I become better at public speaking?",
    "Write a letter to a friend you have not seen in years.",
    "What makes a good team leader?",
    "Describe a futuristic city in the year 2200.",
    "How do I make a simple vegetable soup?",
]


def passage(topic: str, chars: int = 900) -> str:
    from pydoc_data.topics import topics

    text = topics[topic]
    return text[:text.rfind("\n\n", 0, chars)].strip()


def code_file(i: int) -> str:
    import json.decoder
    import shlex
    import textwrap

    functions = [textwrap.dedent, textwrap.indent, shlex.quote, shlex.join, json.decoder.py_scanstring]
    return inspect.getsource(functions[i % len(functions)])


def grounded_messages(n: int) -> list[str]:
    """Rewrite, summarize and edit requests, each over its own passage or code."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(f"Rewrite the following text in clear, simple English, keeping its structure:\n\n"
                       f"{passage(TOPICS[i % len(TOPICS)])}")
        elif kind == 1:
            out.append(f"Summarize the following text:\n\n{passage(TOPICS[i % len(TOPICS)])}")
        else:
            out.append(f"Add a docstring and comments to this Python function and return the whole function:\n\n"
                       f"```python\n{code_file(i)}```")
    return out


EDITS = ["rename its first parameter to `value`", "add type hints to its signature",
         "replace its docstring with a one-line summary", "rename the function with a `_v2` suffix"]


def code_edit_messages(n: int) -> list[str]:
    """Code editing: rewrite a given function with a small change (the output mostly copies the input)."""
    return [f"Rewrite this Python function so that you {EDITS[i % len(EDITS)]}; return the whole function:\n\n"
            f"```python\n{code_file(i)}```" for i in range(n)]


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, batch: int) -> dict:
    """Generate greedily ``batch`` requests at a time; decode time and tokens after each wave's first tokens."""
    engine = llm.engine
    # every run starts cold: a prompt's prefix-cache hit computes its tail with another attention kernel
    # than a cold prefill does, which may change a near-tie greedy token and so the output compared
    engine.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    stats0 = dict(engine.stats)
    outputs: dict[str, list[int]] = {}
    decode_s, decode_tokens = 0.0, 0
    for w in range(0, len(prompts), batch):
        ids = [engine.add_request(p, params) for p in prompts[w:w + batch]]
        started = set()
        t0 = gen0 = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                started.add(out.request_id)
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
            if t0 is None and len(started) == len(ids):
                t0, gen0 = time.perf_counter(), engine.num_generated_tokens
        decode_s += time.perf_counter() - t0
        decode_tokens += engine.num_generated_tokens - gen0
    stats = engine.stats
    result = {"tok_s": decode_tokens / decode_s, "tokens": decode_tokens, "seconds": decode_s,
              "outputs": [outputs[i] for i in sorted(outputs, key=int)]}
    if "spec_drafts" in stats:
        drafted = stats["spec_draft_tokens"] - stats0["spec_draft_tokens"]
        accepted = stats["spec_accepted_tokens"] - stats0["spec_accepted_tokens"]
        verifications = stats["spec_drafts"] - stats0["spec_drafts"]
        result |= {"draft_tokens": drafted, "accepted": accepted, "acceptance_rate": accepted / max(drafted, 1),
                   "mean_acceptance_length": 1 + accepted / max(verifications, 1)}
    return result


def run_llama_cpp(gguf: Path, prompts: list[list[int]], lengths: list[int], lookup: bool) -> dict:
    """llama.cpp single stream (its high-level API), greedy, the same number of tokens as infera made."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=8) if lookup else None
    # with a draft, llama-cpp-python keeps the logits of every position (its score rows otherwise
    # stop at n_batch, and a verification past position 512 overflows them)
    llm = llama_cpp.Llama(str(gguf), n_ctx=4096, n_threads=2, n_batch=512, draft_model=draft, logits_all=lookup,
                          verbose=False)
    seconds, tokens = 0.0, 0
    for prompt, n in zip(prompts, lengths):
        llm.reset()
        first = None
        count = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == n:
                break
        seconds += time.perf_counter() - first
        tokens += count - 1
    llm.close()
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def table(title: str, results: dict[str, dict]) -> list[str]:
    base = results["plain"]["tok_s"]
    lines = [title, f"  {'config':<22} {'decode tok/s':>12} {'vs plain':>9} {'acceptance':>11} {'accept len':>11} {'same output':>12}"]
    for name, r in results.items():
        acc = f"{100 * r['acceptance_rate']:.0f}%" if "acceptance_rate" in r else "-"
        length = f"{r['mean_acceptance_length']:.2f}" if "mean_acceptance_length" in r else "-"
        same = "-" if "outputs" not in r or name == "plain" else \
            f"{sum(a == b for a, b in zip(r['outputs'], results['plain']['outputs']))}/{len(r['outputs'])}"
        lines.append(f"  {name:<22} {r['tok_s']:>12.1f} {r['tok_s'] / base:>8.2f}x {acc:>11} {length:>11} {same:>12}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file, model dir or `infera models` name (default: the bundled SmolLM2-135M Q4_1)")
    parser.add_argument("--methods", default="ngram,recycle,self", help="comma-separated proposers")
    parser.add_argument("--draft", default=None, help="also run draft:PATH with this draft model")
    parser.add_argument("--draft-vocab-sizes", default="0,32768",
                        help="comma list of speculative_draft_vocab_size for --draft (0: the whole vocabulary)")
    parser.add_argument("--tasks", default="input-grounded,code editing,open chat",
                        help="comma-separated task sets: input-grounded, code editing, open chat")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="draft length (default: the engine's)")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer prompts and tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement, interleaved; best kept")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()

    gguf = resolve(args.model) if args.model else default_model_path()
    methods = {m: {} for m in args.methods.split(",") if m}
    for size in map(int, args.draft_vocab_sizes.split(",") if args.draft else []):
        name = f"draft:{args.draft}" + (f" vocab {size}" if size else "")
        methods[name] = {"speculative_draft_vocab_size": size}
    single_n, batch_n, max_tokens = (3, 16, 64) if args.quick else (6, 16, 160)
    engines = {"plain": LLM(str(gguf), kv_cache_memory="512MiB")}
    for name, extra in methods.items():
        engines[name] = LLM(str(gguf), kv_cache_memory="512MiB", speculative=name.split(" ")[0], **extra,
                            **({"num_speculative_tokens": args.num_speculative_tokens} if args.num_speculative_tokens else {}))
    tok = engines["plain"].tokenizer
    tasks = {"input-grounded": grounded_messages(batch_n), "code editing": code_edit_messages(batch_n),
             "open chat": OPEN_CHAT[:batch_n]}
    tasks = {k: v for k, v in tasks.items() if k in args.tasks.split(",")}
    print(f"machine: {machine()}\nmodel: {gguf.name}; up to {max_tokens} tokens per request, greedy, EOS stops\n")
    for llm in engines.values():  # warm-up
        llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
    everything: dict = {"machine": machine(), "model": gguf.name}
    for task, messages in tasks.items():
        prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)
                   for m in messages]
        for mode, ps, batch in (("single stream", prompts[:single_n], 1), ("batch of 16", prompts, 16)):
            results: dict[str, dict] = {}
            for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
                for name, llm in engines.items():
                    r = run(llm, ps, max_tokens, batch)
                    if name not in results or r["tok_s"] > results[name]["tok_s"]:
                        results[name] = r
            if batch == 1 and have("llama_cpp") and gguf.suffix == ".gguf":
                lengths = [len(o) for o in results["plain"]["outputs"]]
                results["llama.cpp"] = run_llama_cpp(gguf, ps, lengths, lookup=False)
                results["llama.cpp prompt-lookup"] = run_llama_cpp(gguf, ps, lengths, lookup=True)
            title = f"{task}, {mode}: {len(ps)} requests, {results['plain']['tokens']} decode tokens"
            print("\n".join(table(title, results)) + "\n", flush=True)
            everything[f"{task}, {mode}"] = {k: {n: v for n, v in r.items() if n != "outputs"} for k, r in results.items()}
    save_json(args.json, everything)


if __name__ == "__main__":
    main()
