"""Tune the adaptive stopping rules on one problem seed by replaying a full-budget run, so the
benchmark on another seed runs them with frozen settings.

A full-budget run (`benchmarks/scaling.py --stops none`, whose details.jsonl keeps every problem's
finished samples as [answer, tokens, score]) is replayed under each rule setting: the samples are
launched in a random order (they are exchangeable), in the rule's windows; the samples of a window
finish shortest first, and after each the rule's own `settled` test (infera/scaling/stopping.py)
decides whether to stop, the samples still running having generated as many tokens as the one that
just finished. The answer is the vote of the finished samples (weighted by score for weighted
best-of-N), as the engine's. Accuracy and tokens are averaged over `--orders` launch orders.

For each rule and method the cheapest setting whose replayed accuracy is within `--tolerance` of
the full budget's (replayed over the same orders) is chosen. (deepconf needs per-token
confidences, which a full run does not record: it is not tuned here.)

    python benchmarks/stopping_tune.py benchmarks/results/stopping-tune/arithmetic/details.jsonl \
        [--budget 32] [--orders 20] [--tolerance 0.01] [--csv docs/stopping_tuning.csv] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infera.scaling.answers import answers_equal  # noqa: E402
from infera.scaling.selection import vote  # noqa: E402
from infera.scaling.stopping import StoppingRule  # noqa: E402

METHODS = {"self_consistency": False, "weighted_best_of_n": True}  # method -> whether votes weigh by score
SETTINGS = ([("esc", dict(window=w)) for w in (2, 3, 4, 5, 6, 8)]
            + [("beta", dict(window=w, confidence=c)) for w in (2, 4, 8) for c in (0.6, 0.7, 0.8, 0.9, 0.95)]
            + [("short_m", dict(m=m)) for m in (1, 2, 4, 8, 12, 16, 24)])


@dataclass
class Sample:
    answer: str | None
    tokens: int
    score: float | None


def replay(samples: list[Sample], rule: StoppingRule | None, budget: int) -> tuple[dict[str, str | None], int]:
    """Each method's answer and the generated tokens of one problem under ``rule``, the samples in
    launch order."""
    launched, tokens = 0, 0
    finished: list[int] = []
    while launched < budget:
        window = list(range(launched, launched + (budget if rule is None else rule.next_window(launched, budget))))
        launched += len(window)
        running = sorted(window, key=lambda i: samples[i].tokens)
        for j, i in enumerate(running):
            finished.append(i)
            in_flight = len(running) - j - 1
            if rule is not None and rule.settled([samples[k].answer for k in finished], in_flight):
                tokens += sum(samples[k].tokens for k in running[:j + 1]) + in_flight * samples[i].tokens
                launched = budget
                break
        else:
            tokens += sum(samples[k].tokens for k in window)
    kept = sorted(finished)  # the vote sees them in launch order, as the engine's
    answers = [samples[k].answer for k in kept]
    chosen = {}
    for method, weighted in METHODS.items():
        winners, _ = vote(answers, [samples[k].score or 0.0 for k in kept] if weighted else None)
        chosen[method] = answers[winners[0]]
    return chosen, tokens


def evaluate(problems: list[tuple[list[Sample], str]], rule: StoppingRule | None, budget: int, orders: int,
             seed: int) -> tuple[dict[str, float], float]:
    """Each method's mean accuracy, and the mean generated tokens per problem, over ``orders``
    random launch orders (the same orders for every rule)."""
    rng = random.Random(seed)
    correct, tokens = dict.fromkeys(METHODS, 0), 0
    for _ in range(orders):
        for samples, reference in problems:
            answers, used = replay(rng.sample(samples, len(samples)), rule, budget)
            for method, answer in answers.items():
                correct[method] += answers_equal(answer, reference)
            tokens += used
    n = orders * len(problems)
    return {m: c / n for m, c in correct.items()}, tokens / n


def load(path: Path, budget: int) -> list[tuple[list[Sample], str]]:
    """The full-budget records at ``budget`` (the sampling methods share their samples):
    (samples, reference) per problem."""
    problems = {}
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            if d["budget"] == budget and d.get("samples") and "+" not in d["method"]:
                problems[d["question"]] = ([Sample(*s) for s in d["samples"]], d["reference"])
    if not problems:
        raise SystemExit(f"{path}: no full-budget records with samples at budget {budget} (scaling.py --stops none)")
    return list(problems.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("details", type=Path, help="details.jsonl of a full-budget run (scaling.py --stops none)")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--orders", type=int, default=20, help="random launch orders averaged")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy the chosen setting may lose")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=None, help="write every setting's row here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of accuracy against tokens per rule and method")
    args = p.parse_args()
    problems = load(args.details, args.budget)
    full, full_tokens = evaluate(problems, None, args.budget, args.orders, args.seed)
    print(f"{len(problems)} problems; full budget: {full_tokens:.0f} tokens, "
          + ", ".join(f"{m} {100 * a:.1f}%" for m, a in full.items()))
    rows, chosen = [], {}
    for kind, opts in SETTINGS:
        accuracy, tokens = evaluate(problems, StoppingRule.make(kind, **opts), args.budget, args.orders, args.seed)
        for method, acc in accuracy.items():
            row = {"method": method, "stop": kind, **{k: opts.get(k, "") for k in ("window", "confidence", "m")},
                   "accuracy": round(acc, 4), "full_accuracy": round(full[method], 4), "tokens": round(tokens, 1),
                   "vs_full": round(tokens / full_tokens, 3)}
            rows.append(row)
            best = chosen.get((method, kind))
            if acc >= full[method] - args.tolerance and (best is None or tokens < best["tokens"]):
                chosen[(method, kind)] = row
    for (method, kind), row in sorted(chosen.items()):
        opts = ", ".join(f"{k}={row[k]}" for k in ("window", "confidence", "m") if row[k] != "")
        print(f"chosen for {method} / {kind}: {opts}: {100 * row['accuracy']:.1f}% at {row['vs_full']:.2f}x tokens")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, [*rows[0], "chosen"])
            writer.writeheader()
            writer.writerows({**r, "chosen": chosen.get((r["method"], r["stop"])) is r} for r in rows)
        print(f"wrote {args.csv}")
    if args.plot:
        plot(rows, full, len(problems), args.plot)
        print(f"wrote {args.plot}")


def plot(rows: list[dict], full: dict[str, float], problems: int, path: Path) -> None:
    """Replayed accuracy against the fraction of the full budget's tokens, a panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(6 * len(METHODS), 4.5), sharex=True)
    for ax, method in zip(axes, METHODS):
        for kind in dict.fromkeys(r["stop"] for r in rows):
            pts = sorted((r["vs_full"], 100 * r["accuracy"]) for r in rows
                         if r["method"] == method and r["stop"] == kind)
            ax.plot(*zip(*pts), "o-", label=kind, alpha=0.8)
        ax.axhline(100 * full[method], color="k", ls="--", lw=1, label="full budget")
        ax.set_title(method)
        ax.set_xlabel("generated tokens / full budget's")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"stopping rules replayed on {problems} problems (tuning seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
