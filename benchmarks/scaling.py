r"""Inference-time scaling benchmark on the bundled SmolLM2-135M-Instruct and the arithmetic task.

1. Accuracy against budget for every method (best-of-N, self-consistency, weighted best-of-N,
   beam search, particle filtering), with the built-in arithmetic checker and with the model
   judging itself, through ``infera eval``'s machinery: OUT/<reward>/results.csv and
   accuracy.png, resumable (pairs already in a CSV are not run again).
2. The same particle filtering, in the engine and driven over the OpenAI API step by step as
   the HTTP libraries (search-and-learn, its_hub) do it: every step of every particle is a
   ``/v1/completions`` request that re-sends the prompt and the partial answer as text to an
   ``infera serve`` subprocess (prefix cache on), one problem at a time, its particles
   concurrently.  The search code is the same; only the driver differs.  Reported: wall time and
   prompt tokens the engine computed (prefill), in-engine vs over HTTP, and their ratios.  A
   second HTTP run sends the exact token ids instead of text (``return_token_ids``): text makes
   the server re-tokenize each partial answer, and a step boundary re-tokenized differently
   (".\n\n" generated as "." "\n" "\n", re-read as "." "\n\n") changes what the model writes next.

The problems are prompted with ``--fewshot`` worked examples (default 3, one of each kind).

Every run redraws ``--plot`` (default docs/scaling_arithmetic.png) from all the results under
OUT, so a long benchmark can be split into several runs sharing one OUT (see the README).

    python benchmarks/scaling.py                                      # 200 problems, budgets 1..32
    python benchmarks/scaling.py --problems 50 --budgets 1,4,8 --out /tmp/scaling
    python benchmarks/scaling.py --rewards arithmetic --http-budget 0  # accuracy only
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
from common import machine, save_json
from prometheus_client.parser import text_string_to_metric_families
from serve import launch
from tqdm.auto import tqdm

from infera import LLM
from infera.eval.scaling import (EVAL_METHODS, evaluate_all, parse_budgets, parse_methods, parse_options,
                                 parse_stops, read_rows)
from infera.eval.tasks import Task, load_tasks
from infera.scaling.answers import answers_equal
from infera.scaling.api import build_search, run_searches
from infera.scaling.result import ScalingResult
from infera.scaling.search import Expand, Search

REWARD_NAMES = {"arithmetic": "arithmetic checker", "self": "self-judging"}


class HTTPDriver:
    """Fulfils a search's expand operations over ``/v1/completions``: one request per particle
    and step, whose prompt is the problem's chat prompt plus the partial answer, as text (as the
    HTTP libraries send it) or, with ``tokens``, as the exact token ids (``return_token_ids``)."""

    def __init__(self, client: openai.AsyncOpenAI, tokenizer, tokens: bool = False):
        self.client = client
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.generated = 0

    async def run(self, search: Search) -> ScalingResult:
        prompt = self.tokenizer.hf.apply_chat_template(search.problem.messages, tokenize=False,
                                                       add_generation_prompt=True)
        results = None
        while True:
            try:
                ops = search.gen.send(results)
            except StopIteration as stop:
                return stop.value
            results = await asyncio.gather(*(self.expand(search, prompt, op) for op in ops))

    async def expand(self, search: Search, prompt: str, op: Expand) -> list:
        if not isinstance(op, Expand):
            raise ValueError("only expand operations are driven over HTTP (use the arithmetic reward)")
        p = op.params
        sent = op.branch.token_ids if self.tokens else prompt + op.branch.text
        outs = await asyncio.gather(*(self.client.completions.create(
            model="bench", prompt=sent, max_tokens=p.max_tokens, temperature=p.temperature,
            top_p=p.top_p, stop=p.stop, seed=(p.seed + i) % 2**62,
            extra_body={"include_stop_str_in_output": True, "return_token_ids": self.tokens}) for i in range(op.n)))
        children = []
        for out in outs:
            choice = out.choices[0]
            self.generated += out.usage.completion_tokens
            # as text, the token ids are the server's business: only their count matters to the search
            new = choice.model_extra["token_ids"] if self.tokens else [0] * out.usage.completion_tokens
            stop_reason = (choice.model_extra or {}).get("stop_reason")
            children.append(search.child(op.branch, op.branch.token_ids + new, choice.text, choice.finish_reason,
                                         stop_reason))
        return children


def server_prompt_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "infera:prompt_tokens_total")


def particle_filtering_in_engine(llm: LLM, tasks: list[Task], budget: int, options: dict) -> dict:
    engine = llm.engine
    engine.reset_prefix_cache()
    searches = [build_search(engine, t.question, "particle_filtering", budget, "arithmetic", options, t.answer)
                for t in tasks]
    before, started = engine.num_prompt_tokens, time.perf_counter()
    run_searches(engine, searches, use_tqdm=True, desc=f"in-engine particle_filtering @ {budget}")
    wall = time.perf_counter() - started
    results = [s.result for s in searches]
    return {"wall_s": wall, "prefill_tokens": engine.num_prompt_tokens - before,
            "generated_tokens": sum(r.generated_tokens for r in results),
            "accuracy": sum(answers_equal(r.answer, t.answer) for r, t in zip(results, tasks)) / len(tasks)}


async def particle_filtering_over_http(llm: LLM, url: str, tasks: list[Task], budget: int, options: dict,
                                       concurrency: int, tokens: bool) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=1024)))
    driver = HTTPDriver(client, llm.tokenizer, tokens)
    searches = [build_search(llm.engine, t.question, "particle_filtering", budget, "arithmetic", options, t.answer)
                for t in tasks]
    bar = tqdm(total=len(tasks), desc=f"over HTTP ({'token ids' if tokens else 'text'}) particle_filtering @ {budget}",
               unit="problem")
    gate = asyncio.Semaphore(concurrency)

    async def one(search: Search) -> ScalingResult:
        async with gate:
            result = await driver.run(search)
            bar.update(1)
            return result

    before, started = server_prompt_tokens(url), time.perf_counter()
    results = await asyncio.gather(*(one(s) for s in searches))
    wall = time.perf_counter() - started
    bar.close()
    await client.close()
    return {"wall_s": wall, "prefill_tokens": int(server_prompt_tokens(url) - before),
            "generated_tokens": driver.generated,
            "accuracy": sum(answers_equal(r.answer, t.answer) for r, t in zip(results, tasks)) / len(tasks)}


def num_problems(out: Path) -> int:
    """How many problems a results directory of ``evaluate_all`` was run on (from details.jsonl)."""
    first = None
    count = 0
    with (out / "details.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            first = first or (d["method"], d["budget"])
            count += (d["method"], d["budget"]) == first
    return count


def plot_rewards(out: Path, path: Path) -> None:
    """Accuracy against budget, one panel per reward found under ``out``, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r, read_rows(out / r / "results.csv")) for r in REWARD_NAMES]
    panels = [(r, rows) for r, rows in panels if rows]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (reward, rows) in zip(axes[0], panels):
        for method in EVAL_METHODS:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
            if mine:
                ax.plot([r["budget"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=method)
        ax.set_xscale("log", base=2)
        budgets = sorted({r["budget"] for r in rows})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("budget (samples / beams / particles)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"reward: {REWARD_NAMES[reward]}, {num_problems(out / reward)} problems")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M-Instruct, arithmetic word problems")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the bundled SmolLM2-135M)")
    p.add_argument("--problems", type=int, default=200, help="arithmetic problems (fixed seed)")
    p.add_argument("--problem-seed", type=int, default=0)
    p.add_argument("--fewshot", type=int, default=3, help="worked examples before each question (one of each kind)")
    p.add_argument("--budgets", default="1,2,4,8,16,32")
    p.add_argument("--methods", default=",".join(EVAL_METHODS))
    p.add_argument("--stops", default="none",
                   help="comma list of adaptive stopping rules for the sampling methods (none: the whole budget; "
                        "esc, beta, short_m, first_finish)")
    p.add_argument("--rewards", default="arithmetic,self", help="comma list: arithmetic, self")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens in one solution")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="seed of each search's random choices")
    p.add_argument("--kv-cache-memory", default="2GiB", help="KV cache of the engine and of the server")
    p.add_argument("--http-budget", type=int, default=8, help="particles of the in-engine vs HTTP run (0: skip)")
    p.add_argument("--http-problems", type=int, default=None, help="problems of that run (default: --problems)")
    p.add_argument("--http-concurrency", type=int, default=1,
                   help="problems in flight over HTTP (1: one at a time, as the HTTP libraries' loops do)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another method option (repeatable), e.g. stop_window=4 stop_confidence=0.8")
    p.add_argument("--out", default="benchmarks/results/scaling", help="output directory")
    p.add_argument("--plot", default="docs/scaling_arithmetic.png",
                   help="accuracy plot of every reward's results under --out")
    args = p.parse_args()
    tasks, examples = load_tasks("arithmetic", args.problems, args.problem_seed, args.fewshot)
    budgets, methods = parse_budgets(args.budgets), parse_methods(args.methods)
    rewards = args.rewards.split(",") if args.rewards else []
    options = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
               **parse_options(args.option)}
    if examples:
        options["examples"] = examples
    out = Path(args.out)
    print(f"machine: {machine()}", flush=True)
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory)
    summary: dict = {"machine": machine(), "problems": len(tasks), "options": options, "accuracy": {}}
    for reward in rewards:
        rows = evaluate_all(llm.engine, {}, tasks, methods, budgets, reward, options, out / reward,
                            f"SmolLM2-135M-Instruct, arithmetic, {len(tasks)} problems, {REWARD_NAMES[reward]}",
                            parse_stops(args.stops))
        summary["accuracy"][reward] = rows
        acc = {(r["method"], r["budget"]): r["accuracy"] for r in rows}
        pf8, b32 = acc.get(("particle_filtering", 8)), acc.get(("best_of_n", 32))
        sc32 = acc.get(("self_consistency", 32))
        if None not in (pf8, b32, sc32):
            print(f"[{reward}] particle filtering @ 8: {100 * pf8:.1f}%  vs  best-of-N @ 32: {100 * b32:.1f}%, "
                  f"self-consistency @ 32: {100 * sc32:.1f}%  -> target {'met' if pf8 >= max(b32, sc32) else 'missed'}")
    if args.http_budget:
        http_tasks = tasks[:args.http_problems or len(tasks)]
        engine_run = particle_filtering_in_engine(llm, http_tasks, args.http_budget, options)
        server_args = ["--kv-cache-memory", args.kv_cache_memory, "--log-level", "WARNING"]
        with launch("infera", str(llm.engine.model_path), server_args, 0) as server:
            runs = {name: asyncio.run(particle_filtering_over_http(llm, server.url, http_tasks, args.http_budget,
                                                                   options, args.http_concurrency, tokens))
                    for name, tokens in (("over HTTP, text", False), ("over HTTP, token ids", True))}
        summary["http"] = {"budget": args.http_budget, "problems": len(http_tasks), "in_engine": engine_run,
                           "over_http": runs, "http_concurrency": args.http_concurrency}
        print(f"\nparticle filtering @ {args.http_budget}, {len(http_tasks)} problems, arithmetic checker")
        print(f"{'':>22} {'wall s':>9} {'prefill tok':>12} {'generated':>10} {'ms/token':>9} {'accuracy':>9}")
        for name, r in (("in-engine", engine_run), *runs.items()):
            print(f"{name:>22} {r['wall_s']:9.1f} {r['prefill_tokens']:12d} {r['generated_tokens']:10d} "
                  f"{1e3 * r['wall_s'] / r['generated_tokens']:9.2f} {100 * r['accuracy']:8.1f}%")
        for name, r in runs.items():
            print(f"in-engine vs {name}: {r['wall_s'] / engine_run['wall_s']:.1f}x faster (target >= 3x), "
                  f"{r['prefill_tokens'] / max(engine_run['prefill_tokens'], 1):.1f}x fewer prefill tokens "
                  f"(target >= 5x)")
    plot_rewards(out, Path(args.plot))
    save_json(str(out / "summary.json"), summary)
    print(f"wrote {out}/summary.json")


if __name__ == "__main__":
    main()
