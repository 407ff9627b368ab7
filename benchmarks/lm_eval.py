"""External check of log-likelihoods: lm-evaluation-harness scores one multiple-choice task twice,
through ``infera serve`` (its ``local-completions`` model: echo + logprobs over /v1/completions)
and through its HF transformers backend (``hf``) on the same weights; the per-choice
log-likelihoods must agree (to 1e-3 by default) and so must the accuracies.

The task is generated here from English prose shipped with Python (the pydoc topics, fixed seed):
a passage, then its true continuation among three continuations taken from elsewhere.  The
bundled SmolLM2-135M-Instruct GGUF is served with ``--dtype float32`` (dequantized, as transformers
loads a GGUF), so both sides compute the same function in float32.

    python benchmarks/lm_eval.py                       # make bench-lm_eval
    python benchmarks/lm_eval.py --save-json docs/lm_eval.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from common import corpus_text, machine, save_json
from serve import LaunchedServer, free_port

HERE = Path(__file__).resolve().parent
# this file is named lm_eval.py: the harness's package must be found, not it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "infera_pydoc_continuation"


def make_items(num_items: int, seed: int, context_words: int = 32, continuation_words: int = 8) -> list[dict]:
    """Multiple-choice items: a passage of ``context_words`` words, its next ``continuation_words``
    words among three spans of the same length from elsewhere in the same paragraph (from other
    paragraphs where it is too short), the answer's position random."""
    rng = random.Random(seed)
    n = continuation_words
    paragraphs = [p.split() for p in re.split(r"\n\s*\n", corpus_text())]
    paragraphs = [p for p in paragraphs if len(p) >= context_words + n and " ".join(p).isascii()]
    items = []
    while len(items) < num_items:
        words = rng.choice(paragraphs)
        start = rng.randrange(len(words) - context_words - n + 1)
        cut = start + context_words
        context = " ".join(words[start:cut])
        choices = [" ".join(words[cut:cut + n])]
        spans = [words[a:a + n] for a in range(len(words) - n + 1) if abs(a - cut) >= n]
        if len(spans) < 3:
            spans = [(p, rng.randrange(len(p) - n + 1)) for p in rng.sample(paragraphs, 3)]
            spans = [p[a:a + n] for p, a in spans]
        choices += [" ".join(span) for span in rng.sample(spans, 3)]
        if len(set(choices)) < 4:
            continue
        label = rng.randrange(4)
        choices[0], choices[label] = choices[label], choices[0]
        items.append({"context": context, "choices": choices, "label": label})
    return items


def task_config(data_file: Path) -> dict:
    return {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def evaluate(model: str, model_args: dict, task: dict, batch_size: int) -> tuple[float, list[list[float]], float]:
    """The accuracy, each item's per-choice log-likelihoods (in document order) and the seconds taken."""
    import lm_eval

    started = time.monotonic()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], batch_size=batch_size,
                                  log_samples=True, bootstrap_iters=0)
    seconds = time.monotonic() - started
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    loglikelihoods = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]
    return out["results"][TASK]["acc,none"], loglikelihoods, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per request (and per HF forward pass)")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--save-json")
    args = ap.parse_args()

    import torch
    from infera.loader.gguf_file import GGUFFile
    from infera.loader.model_loader import default_model_path

    model_path = default_model_path()
    tokenizer_dir = GGUFFile(model_path).tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-"))
    data_file = work / "items.jsonl"
    data_file.write_text("".join(json.dumps(item) + "\n" for item in make_items(args.items, args.seed)))
    task = task_config(data_file)
    print(f"{args.items} items ({data_file}); model {model_path}", flush=True)

    port = free_port()
    argv = [sys.executable, "-m", "infera.cli", "serve", "--model", str(model_path), "--dtype", "float32",
            "--port", str(port), "--served-model-name", "bench"]
    with LaunchedServer("infera", argv, port) as server:
        infera_acc, infera_ll, infera_s = evaluate(
            "local-completions", {"model": "bench", "base_url": f"{server.url}/v1/completions",
                                  "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir),
                                  "num_concurrent": 1, "max_retries": 1}, task, args.batch_size)
    hf_acc, hf_ll, hf_s = evaluate(
        "hf", {"pretrained": str(model_path.parent), "gguf_file": model_path.name, "dtype": "float32",
               "device": "cpu"}, task, args.batch_size)

    diffs = [abs(a - b) for xs, ys in zip(infera_ll, hf_ll) for a, b in zip(xs, ys)]
    same_choice = sum(max(range(4), key=xs.__getitem__) == max(range(4), key=ys.__getitem__)
                      for xs, ys in zip(infera_ll, hf_ll))
    report = {
        "machine": machine(), "command": "make bench-lm_eval ARGS='--save-json docs/lm_eval.json'",
        "lm_eval_version": __import__("lm_eval").__version__, "torch": torch.__version__,
        "model": model_path.name, "infera_flags": "--dtype float32",
        "api_requests": f"lm-eval's local-completions, unchanged: token-id prompts ({args.batch_size} per request), "
                        f"echo true, logprobs 1, max_tokens 1, temperature 0",
        "items": args.items, "choices": len(diffs),
        "seed": args.seed, "accuracy": {"infera": infera_acc, "hf": hf_acc},
        "loglikelihood_abs_diff": {"max": max(diffs), "mean": sum(diffs) / len(diffs)},
        "same_choice_picked": same_choice, "seconds": {"infera": round(infera_s, 1), "hf": round(hf_s, 1)},
        "tolerance": args.tolerance,
        "agree": max(diffs) <= args.tolerance and infera_acc == hf_acc,
    }
    print(f"accuracy: infera {infera_acc:.4f}, HF {hf_acc:.4f}; per-choice log-likelihood |diff| max "
          f"{max(diffs):.2e}, mean {report['loglikelihood_abs_diff']['mean']:.2e} over {len(diffs)} choices; "
          f"same choice picked on {same_choice}/{args.items}; {infera_s:.0f} s via infera serve, {hf_s:.0f} s via HF")
    save_json(args.save_json, report)
    if not report["agree"]:
        sys.exit(f"disagreement: max |diff| {max(diffs):.2e} (tolerance {args.tolerance}), "
                 f"accuracy {infera_acc} vs {hf_acc}")


if __name__ == "__main__":
    main()
