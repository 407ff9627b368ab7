"""Peer benchmark of infera's KV policies: NVIDIA's kvpress (0.5.5, on HF transformers) on the
passkey problems of ``infera eval --task passkey``.

Two steps, in two virtualenvs (kvpress 0.5.5 needs transformers<5.3, infera's venv has 5.x newer):

1. ``--make-problems FILE.json`` (infera's venv): the problems ``infera eval --task passkey`` asks
   for the same ``--lengths/--depths/--samples/--passkey-seed`` (built by
   :func:`infera.eval.passkey.make_problems`, the function ``infera eval`` calls, with infera's
   tokenizer of the model), written as token ids and keys.
2. ``--run FILE.json`` (the kvpress venv, ``.venv-kvpress``): the same GGUF loaded by transformers
   (dequantized to float32, CPU, 2 threads) answers every problem with no press and with
   ``StreamingLLMPress`` and ``SnapKVPress`` (kvpress defaults: 4 sink tokens; a window of 64
   queries, pooling kernel 5) at each ``--ratios`` (kvpress's ``compression_ratio``, the fraction of
   the KV removed: 0.75 keeps a quarter, infera's budget 0.25).  OpenMP spins as in infera
   (``GOMP_SPINCOUNT=10000``, set before torch loads).

How kvpress is called: as its ``kv-press-text-generation`` pipeline does
(``KVPressTextGenerationPipeline.forward``, i.e. ``_forward`` under the pipeline's inference
context), with the tokenization step skipped so that the token ids are infera's exactly (the
pipeline's ``preprocess`` would apply the chat template and re-tokenize text).  Each problem is split
into the context (everything before "What is the pass key? The pass key is") and the question
(those tokens, their count from infera's tokenizer).  The pipeline prefills the context under
``with press(model)`` (the press compresses its KV as each layer's prefill ends), then feeds the
question uncompressed at its true positions and decodes greedily (8 new tokens, stopping at EOS):
kvpress's documented way, which keeps the question out of the compression (unlike ``with
press(model): model.generate(...)``).  SnapKV's observation window is therefore the context's last
64 tokens (haystack text), not the question; infera compresses the whole prompt, question
included.  ``--compress-question`` puts the question into the compressed context (all but the
prompt's last token), the setting infera's policies run in.

A problem is right when ``str(key)`` is in the decoded answer (as in infera's eval).  Per (press,
ratio, length): accuracy, the context tokens kvpress kept (mean), the KV fraction held when it
answered ((kept + question + answer tokens) / (prompt + answer tokens), infera's ``kv_fraction``;
``kv_bytes``: float32, as transformers holds it) and the seconds of the batch (the pipeline answers
one problem at a time): ``seconds`` is the wall time less the stretches the process was stopped or
starved (:class:`PauseClock`; ``wall_seconds`` and ``paused_seconds`` as measured), ``cpu_seconds``
the process's CPU time.

    PYTHONPATH=. .venv/bin/python benchmarks/kvpress_peer.py --make-problems /tmp/passkey.json
    .venv-kvpress/bin/python benchmarks/kvpress_peer.py --run /tmp/passkey.json --save-json docs/kvpress_peer.json
    make bench-kvpress          # both (creates .venv-kvpress first)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

DEFAULT_LENGTHS = "1024,2048,4096"
DEFAULT_DEPTHS = "0.1,0.3,0.5,0.7,0.9"


def make_problems_file(args: argparse.Namespace) -> None:
    """Step 1, in infera's venv: the problems of ``infera eval --task passkey`` to ``args.make_problems``."""
    from infera.eval.passkey import QUESTION, make_problems
    from infera.loader.model_loader import open_model
    from infera.loader.tokenizer import Tokenizer

    source = open_model(args.model)
    tokenizer = Tokenizer(source.tokenizer_dir(), source.config())
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    problems = make_problems(tokenizer, lengths, depths, args.samples, args.passkey_seed)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    out = {"model": str(source.path), "lengths": lengths, "depths": depths, "samples": args.samples,
           "passkey_seed": args.passkey_seed, "question_ids": question, "problems": {}}
    for n, items in problems.items():
        rows = []
        for i, (tokens, key) in enumerate(items):
            assert len(tokens) == n and tokens[-len(question):] == question
            rows.append({"depth": depths[i // args.samples], "key": key, "token_ids": tokens})
        out["problems"][str(n)] = rows
    Path(args.make_problems).write_text(json.dumps(out))
    print(f"{sum(len(v) for v in problems.values())} problems ({', '.join(map(str, lengths))} tokens) "
          f"-> {args.make_problems}")


class PauseClock:
    """Seconds this process was held off the CPU altogether (stopped with SIGSTOP, or starved by
    other processes): a thread wakes every ``tick`` seconds, and a wake-up more than ``late``
    seconds behind counts as paused.  Wall time less these is the time the batch ran."""

    def __init__(self, tick: float = 0.05, late: float = 0.5):
        self.tick, self.late, self.paused = tick, late, 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            if now - last - self.tick > self.late:
                self.paused += now - last - self.tick
            last = now


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_file(args: argparse.Namespace) -> None:
    """Step 2, in the kvpress venv: answer every problem of ``args.run`` under each press and ratio."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # infera's OpenMP setting (infera/__init__.py), before torch
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    import kvpress
    from kvpress import SnapKVPress, StreamingLLMPress
    from kvpress.pipeline import KVPressTextGenerationPipeline

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.run).read_text())
    model_path = Path(args.model or data["model"])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - started
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    cfg = model.config
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
        (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * 4
    question = data["question_ids"]
    q_len = 1 if args.compress_question else len(question)
    presses = {"none": None, "StreamingLLMPress": StreamingLLMPress, "SnapKVPress": SnapKVPress}
    wanted = args.presses.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]

    def answer(tokens: list[int], press) -> tuple[str, int]:
        """The greedy answer to one problem and the context tokens its compressed KV kept."""
        cache = DynamicCache()
        inputs = {"context_ids": torch.tensor([tokens[:-q_len]]), "questions_ids": [torch.tensor([tokens[-q_len:]])]}
        text = pipe.forward(inputs, press=press, max_new_tokens=args.answer_tokens, cache=cache)[0]
        return text, cache.get_seq_length()  # the pipeline trims the answer off: the compressed context

    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else data["lengths"]
    answer(data["problems"][str(lengths[0])][0]["token_ids"], None)  # warm-up, untimed
    clock = PauseClock()
    configs = [(name, ratio) for name in wanted for ratio in ([0.0] if name == "none" else ratios)]
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvpress": getattr(kvpress, "__version__", None) or
            _version("kvpress"), "model": str(model_path), "dtype": "float32", "model_load_seconds": load_seconds,
            "question_compressed": args.compress_question, "answer_tokens": args.answer_tokens,
            "depths": data["depths"], "samples": data["samples"], "passkey_seed": data["passkey_seed"],
            "press_defaults": {"StreamingLLMPress": {"n_sink": StreamingLLMPress().n_sink},
                               "SnapKVPress": {"window_size": SnapKVPress().window_size,
                                               "kernel_size": SnapKVPress().kernel_size}}}
    rows: list[dict] = []
    if not args.quiet:
        print(f"# {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
              f"{meta['transformers']}, kvpress {meta['kvpress']}; model loaded in {load_seconds:.1f} s", flush=True)
        print(f"{'press':>18} {'ratio':>6} {'length':>6} {'accuracy':>9} {'kept ctx':>9} {'KV frac':>8} "
              f"{'seconds':>8} {'CPU s':>8} {'paused':>8}", flush=True)
    for name, ratio in configs:
        for n in lengths:
            items = data["problems"][str(n)]
            right, kept, answers, by_depth = 0, 0, [], {}
            t0, c0, p0 = time.perf_counter(), time.process_time(), clock.paused
            for item in items:
                tokens = item["token_ids"]
                assert tokens[-len(question):] == question, "problem does not end with the question"
                press = None if presses[name] is None else presses[name](compression_ratio=ratio)
                text, held = answer(tokens, press)
                kept += held
                ok = str(item["key"]) in text
                right += ok
                by_depth.setdefault(str(item["depth"]), []).append(int(ok))
                answers.append(text)
            wall, cpu_seconds, paused = time.perf_counter() - t0, time.process_time() - c0, clock.paused - p0
            seconds = wall - paused
            context = n - q_len
            kept_mean = kept / len(items)
            fraction = (kept_mean + q_len + args.answer_tokens) / (n + args.answer_tokens)
            row = {"press": name, "compression_ratio": ratio, "length": n, "problems": len(items),
                   "accuracy": right / len(items), "context_tokens": context, "kept_context_tokens": kept_mean,
                   "kv_fraction": fraction, "kv_bytes": (kept_mean + q_len + args.answer_tokens) * kv_bytes_per_token,
                   "seconds": seconds, "wall_seconds": wall, "paused_seconds": paused, "cpu_seconds": cpu_seconds,
                   "accuracy_by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()}, "answers": answers}
            rows.append(row)
            if not args.quiet:
                print(f"{name:>18} {ratio:>6.3f} {n:>6} {row['accuracy']:>9.1%} {kept_mean:>9.0f} "
                      f"{fraction:>8.1%} {seconds:>8.1f} {cpu_seconds:>8.1f} {paused:>8.1f}", flush=True)
            if args.save_json:  # after every row: a long run that stops keeps what it measured
                _save(args.save_json, meta, rows)
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _save(path: str, meta: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-problems", metavar="FILE.json", help="write the problems (infera's venv)")
    mode.add_argument("--run", metavar="FILE.json", help="answer the problems with kvpress (the kvpress venv)")
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1; "
                                                 "--run: the one the problems were made with)")
    p.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (comma list; --make-problems default "
                                                   f"{DEFAULT_LENGTHS}, --run default: all in the file)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1] (comma list)")
    p.add_argument("--samples", type=int, default=2, help="problems (keys) per length and depth")
    p.add_argument("--passkey-seed", type=int, default=0, help="seed of the keys and haystack offsets")
    p.add_argument("--presses", default="none,StreamingLLMPress,SnapKVPress", help="presses (comma list)")
    p.add_argument("--ratios", default="0.5,0.75,0.875", help="kvpress compression ratios: fraction of KV removed")
    p.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens generated for the answer")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--compress-question", action="store_true",
                   help="compress the question with the context (all but the prompt's last token), as infera does")
    p.add_argument("--save-json", default=None, help="write meta and rows to this JSON file (--run)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table (--run)")
    args = p.parse_args(argv)
    args.quiet = args.json
    if args.make_problems:
        args.lengths = args.lengths or DEFAULT_LENGTHS
        make_problems_file(args)
    else:
        run_file(args)


if __name__ == "__main__":
    sys.exit(main())
