"""``infera eval --task arithmetic|jsonl:FILE``: accuracy of scaling methods against their budget.

Every (method, budget) pair runs all problems at once through one engine and appends a row to
``OUT/results.csv`` (``method, budget, accuracy, ci_low, ci_high, tokens, prefill_tokens,
wall_s``; the 95% interval of the accuracy by bootstrap over the problems; ``tokens`` are generated
tokens, pruned branches included; ``prefill_tokens`` are prompt tokens computed).  ``--stop``
adds the sampling methods under adaptive stopping rules (rows ``self_consistency+esc``, ...).
A pair already in the CSV is skipped, so an interrupted run resumes where it stopped.  The three
sampling methods (best-of-N, self-consistency, weighted best-of-N) choose from one shared set of
samples per budget, so they report the same tokens and time.  Each pair starts with an empty
prefix cache.  ``OUT/details.jsonl`` holds every problem's answer (the sampling methods' records
also their finished samples as ``[answer, tokens, score]`` in launch order, which
``benchmarks/stopping_tune.py`` replays to tune the stopping rules); ``OUT/accuracy.png`` plots
accuracy against budget and against tokens, one line per method.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from infera.engine.llm_engine import LLMEngine
from infera.eval.tasks import Task, load_tasks
from infera.scaling.answers import answers_equal
from infera.scaling.api import METHODS, build_search, run_searches
from infera.scaling.search import SearchConfig
from infera.scaling.problem import PROMPT_OPTIONS
from infera.scaling.rewards import REWARD_SOURCES
from infera.scaling.sampling import PICKS, shared_samples
from infera.scaling.stopping import STOPPING_RULES

logger = logging.getLogger("infera.eval")

EVAL_METHODS = ("best_of_n", "self_consistency", "weighted_best_of_n", "beam_search", "particle_filtering")
COLUMNS = ("method", "budget", "accuracy", "ci_low", "ci_high", "tokens", "prefill_tokens", "wall_s")
BOOTSTRAP_SAMPLES = 2000


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--budgets", default="1,2,4,8,16,32", help="comma list of budgets (samples, beams or particles)")
    g.add_argument("--reward", default="arithmetic",
                   help=f"reward for the methods that need one: {', '.join(REWARD_SOURCES[:3])}")
    g.add_argument("--problems", type=int, default=None,
                   help="how many problems (arithmetic: generated, default 200; jsonl: the first N, default all)")
    g.add_argument("--problem-seed", type=int, default=0, help="seed of the generated arithmetic problems")
    g.add_argument("--fewshot", type=int, default=0, metavar="K",
                   help="K worked examples before each question (arithmetic: generated ones; jsonl: the first K "
                        'lines with a "solution", left out of the problems)')
    g.add_argument("--stop", default="none",
                   help=f"comma list of adaptive stopping rules for the sampling methods: none (the whole budget), "
                        f"{', '.join(STOPPING_RULES)}; their options by --option (stop_window=8, stop_confidence=0.95, "
                        f"stop_m=2)")
    g.add_argument("--out", default="eval-out", help="directory for results.csv, details.jsonl and accuracy.png")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the branches")
    g.add_argument("--max-tokens", type=int, default=384, help="most tokens in one solution")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another method option (repeatable), e.g. beam_width=2, delimiter='\\n', "
                        "resample_temperature=0.5; VALUE is read as JSON when it parses")


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in budgets):
        raise ValueError(f"every budget must be >= 1, got {text!r}")
    return budgets


def parse_methods(text: str | None) -> list[str]:
    methods = text.split(",") if text else list(EVAL_METHODS)
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(EVAL_METHODS)}")
    return methods


def parse_stops(text: str) -> list[str | None]:
    stops = [None if s == "none" else s for s in text.split(",")]
    unknown = [s for s in stops if s is not None and s not in STOPPING_RULES]
    if unknown:
        raise ValueError(f"unknown stopping rule(s) {', '.join(unknown)}; choose from none, {', '.join(STOPPING_RULES)}")
    return stops


def bootstrap_interval(correct: list[bool], seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the accuracy, resampling the problems (percentile bootstrap)."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(rng.choices(correct, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    return means[int(0.025 * BOOTSTRAP_SAMPLES)], means[int(0.975 * BOOTSTRAP_SAMPLES) - 1]


def parse_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that apply to ``method``: the shared ones and its own (beam_width is beam
    search's, select particle filtering's, ...)."""
    own = set(inspect.signature(METHODS[method]).parameters) - {"s"}
    shared = {f.name for f in fields(SearchConfig)} | set(PROMPT_OPTIONS)
    return {k: v for k, v in options.items() if k in shared | own}


def check_options(methods: list[str], options: dict[str, Any]) -> None:
    known = set().union(*(options_for(m, options) for m in methods))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} apply to none of {', '.join(methods)}")


def label(method: str, stop: str | None) -> str:
    return method if stop is None else f"{method}+{stop}"


def evaluate(engine: LLMEngine, tasks: list[Task], methods: list[str], budget: int, reward: str,
             options: dict[str, Any], stop: str | None = None) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Run ``methods`` (sampling methods sharing their samples) at ``budget`` over ``tasks``, under
    the stopping rule ``stop``: a CSV row per method and a detail record per problem and method."""
    if stop is not None:
        options = {**options, "stop": stop}
    sampling = [m for m in methods if m in PICKS]
    runs = ([("+".join(sampling), sampling)] if sampling else []) + [(m, [m]) for m in methods if m not in PICKS]
    rows, details = {}, []
    for name, group in runs:
        engine.reset_prefix_cache()
        shared = group[0] in PICKS
        needs = next((m for m in group if m != "self_consistency"), group[0])
        own = {**options_for(needs, options), "methods": group} if shared else options_for(needs, options)
        searches = [build_search(engine, t.question, needs, budget, reward if needs != "self_consistency" else None,
                                 own, t.answer, algorithm=shared_samples if shared else None) for t in tasks]
        started = time.monotonic()
        run_searches(engine, searches, use_tqdm=True, desc=f"{label(name, stop)} @ {budget}")
        wall = time.monotonic() - started
        tokens = sum(s.generated_tokens for s in searches)
        prefill = sum(s.prefill_tokens for s in searches)
        for i, method in enumerate(group):
            results = [s.result[i] if shared else s.result for s in searches]
            correct = [answers_equal(r.answer, t.answer) for r, t in zip(results, tasks)]
            low, high = bootstrap_interval(correct)
            tagged = label(method, stop)
            rows[tagged] = {"method": tagged, "budget": budget, "accuracy": sum(correct) / len(tasks), "ci_low": low,
                            "ci_high": high, "tokens": tokens, "prefill_tokens": prefill, "wall_s": round(wall, 2)}
            details += [{"method": tagged, "budget": budget, "question": t.question, "reference": t.answer,
                         "answer": r.answer, "correct": c, "generated_tokens": r.generated_tokens,
                         "prefill_tokens": r.prefill_tokens,
                         "samples": [[k.answer, k.num_tokens, k.score] for k in r.candidates] if shared else None}
                        for t, r, c in zip(tasks, results, correct)]
    return rows, details


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if rows and tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{path} has columns {', '.join(rows[0])}, not {', '.join(COLUMNS)}; use another --out")
    return [{**r, "budget": int(r["budget"]), "accuracy": float(r["accuracy"]), "ci_low": float(r["ci_low"]),
             "ci_high": float(r["ci_high"]), "tokens": int(r["tokens"]),
             "prefill_tokens": int(r["prefill_tokens"]), "wall_s": float(r["wall_s"])} for r in rows]


def plot(rows: list[dict[str, Any]], num_problems: int, path: Path, title: str) -> None:
    """Accuracy (with its bootstrap interval) against budget and against generated tokens per
    problem, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_budget, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        acc = [100 * r["accuracy"] for r in mine]
        errors = [[a - 100 * r["ci_low"] for a, r in zip(acc, mine)], [100 * r["ci_high"] - a for a, r in zip(acc, mine)]]
        by_budget.errorbar([r["budget"] for r in mine], acc, yerr=errors, marker="o", capsize=3, label=method)
        by_tokens.errorbar([r["tokens"] / num_problems for r in mine], acc, yerr=errors, marker="o", capsize=3,
                           label=method)
    by_budget.set_xscale("log", base=2)
    by_budget.set_xlabel("budget (samples / beams / particles)")
    by_tokens.set_xscale("log")
    by_tokens.set_xlabel("generated tokens per problem")
    for ax in (by_budget, by_tokens):
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    by_budget.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_all(engine: LLMEngine | None, engine_kwargs: dict[str, Any], tasks: list[Task], methods: list[str],
                 budgets: list[int], reward: str, options: dict[str, Any], out: Path, title: str,
                 stops: list[str | None] = (None,)) -> list[dict[str, Any]]:
    """Every (method, budget, stopping rule) not yet in ``out/results.csv`` (the rules apply to
    the sampling methods only), appended to it as it finishes; then the plot.  The engine is built
    from ``engine_kwargs`` only if something must run."""
    check_options(methods, options)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    done = {(r["method"], r["budget"]) for r in rows}
    runs = [(stop, [m for m in methods if stop is None or m in PICKS]) for stop in stops]
    todo = [(b, stop, [m for m in ms if (label(m, stop), b) not in done]) for b in budgets for stop, ms in runs]
    todo = [t for t in todo if t[2]]
    if done:
        logger.info("%s: %d rows already there; %d runs left", csv_path, len(done), len(todo))
    if todo and engine is None:
        engine = LLMEngine(**engine_kwargs)
    for budget, stop, pending in todo:
        new_rows, details = evaluate(engine, tasks, pending, budget, reward, options, stop)
        tagged = [label(m, stop) for m in pending]
        write_header = not csv_path.is_file()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if write_header:
                writer.writeheader()
            writer.writerows(new_rows[m] for m in tagged)
        with (out / "details.jsonl").open("a") as f:
            f.writelines(json.dumps(d) + "\n" for d in details)
        rows += [new_rows[m] for m in tagged]
        for m in tagged:
            r = new_rows[m]
            print(f"{m:>24} @ {budget:<3} accuracy {100 * r['accuracy']:5.1f}% [{100 * r['ci_low']:.1f}, "
                  f"{100 * r['ci_high']:.1f}]  tokens {r['tokens']:>8}  prefill {r['prefill_tokens']:>7}  "
                  f"{r['wall_s']:8.1f}s", flush=True)
    shown_labels = {label(m, stop) for stop, ms in runs for m in ms}
    shown = [r for r in rows if r["method"] in shown_labels]
    plot(shown, len(tasks), out / "accuracy.png", title)
    return shown


def run(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> None:
    tasks, examples = load_tasks(args.task, args.problems, args.problem_seed, args.fewshot)
    methods = parse_methods(args.methods)
    budgets = parse_budgets(args.budgets)
    options = {"temperature": args.temperature, "max_tokens": args.max_tokens, **parse_options(args.option)}
    if examples:
        options["examples"] = examples
    out = Path(args.out)
    evaluate_all(None, engine_kwargs, tasks, methods, budgets, args.reward, options, out,
                 f"{args.task}, {len(tasks)} problems, reward {args.reward}", parse_stops(args.stop))
    print(f"wrote {out / 'results.csv'} and {out / 'accuracy.png'}")
