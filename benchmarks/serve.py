"""Serving benchmark: replay N requests against OpenAI-compatible servers, like `vllm bench serve`.

Requests arrive all at once or as a Poisson process (``--request-rate``); each streams its
completion, and the run reports request throughput, output tokens/s, TTFT and inter-token latency
(p50/p99).  The default workload: 64 requests, prompts of 128-512 tokens cut from the Python docs
that ship with the interpreter (``pydoc_data.topics``, fixed seed), 128 output tokens each with EOS
ignored, so every server does the same work.

    python benchmarks/serve.py --url http://127.0.0.1:8000           # a server already running
    python benchmarks/serve.py --launch infera --launch llama-cpp     # start each, compare (same GGUF)
    infera bench serve --launch infera --offline                      # served vs offline throughput

``--launch llama-cpp`` starts ``python -m llama_cpp.server`` (llama-cpp-python, ``pip install
'infera[bench]'``); without it installed that peer is skipped, and the run says so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from common import have, machine, make_workload, save_json
from tqdm.auto import tqdm


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Report:
    name: str
    completed: int
    failed: int
    output_tokens: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms_mean: float
    e2e_ms_p50: float
    first_error: str = ""


# -- workload -----------------------------------------------------------------------------
def load_tokenizer(model_path: str):
    from infera.loader.model_loader import open_model
    from infera.loader.tokenizer import Tokenizer

    source = open_model(model_path)
    return Tokenizer(source.tokenizer_dir(), source.config())


def build_prompts(tokenizer, num: int, input_range: tuple[int, int], output_len: int, seed: int) -> list[str]:
    """The shared workload's prompts (cut from the stdlib's docs), as text any server accepts."""
    workload = make_workload(tokenizer, "serve", num, *input_range, output_len, seed)
    return [tokenizer.decode(p) for p in workload.prompts]


# -- one run ------------------------------------------------------------------------------
async def send(client: httpx.AsyncClient, url: str, body: dict, bar: tqdm) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                if any(c.get("text") for c in event.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks  # servers without usage: one token per chunk
        result.ok = last is not None
        if not result.ok:
            result.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        bar.update(1)
    return result


async def run_load(name: str, url: str, bodies: list[dict], rate: float, seed: int, api_key: str | None) -> Report:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rng = random.Random(seed)
    bar = tqdm(total=len(bodies), desc=f"{name}: requests", unit="req", dynamic_ncols=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(send(client, url, body, bar)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return summarize(name, results, duration)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"mean": statistics.fmean(values) * 1000, "p50": pick(0.50), "p99": pick(0.99)}


def summarize(name: str, results: list[RequestResult], duration: float) -> Report:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return Report(
        name=name, completed=len(ok), failed=len(results) - len(ok), output_tokens=output, duration_s=duration,
        request_throughput=len(ok) / duration, output_throughput=output / duration,
        total_token_throughput=(output + prompt) / duration,
        ttft_ms=percentiles([r.ttft for r in ok]), itl_ms=percentiles([x for r in ok for x in r.itls]),
        tpot_ms_mean=statistics.fmean(tpots) * 1000 if tpots else float("nan"),
        e2e_ms_p50=percentiles([r.latency for r in ok])["p50"],
        first_error=next((r.error for r in results if not r.ok), ""))


def print_report(rep: Report, rate: float) -> None:
    print(f"\n============ {rep.name} ({'all at once' if math.isinf(rate) else f'{rate:g} req/s'}) ============")
    rows = [("successful requests", f"{rep.completed}"), ("failed requests", f"{rep.failed}"),
            ("duration (s)", f"{rep.duration_s:.2f}"), ("request throughput (req/s)", f"{rep.request_throughput:.2f}"),
            ("output token throughput (tok/s)", f"{rep.output_throughput:.1f}"),
            ("total token throughput (tok/s)", f"{rep.total_token_throughput:.1f}"),
            ("TTFT mean / p50 / p99 (ms)", "{mean:.1f} / {p50:.1f} / {p99:.1f}".format(**rep.ttft_ms)),
            ("ITL mean / p50 / p99 (ms)", "{mean:.1f} / {p50:.1f} / {p99:.1f}".format(**rep.itl_ms)),
            ("TPOT mean (ms)", f"{rep.tpot_ms_mean:.1f}"), ("end-to-end latency p50 (ms)", f"{rep.e2e_ms_p50:.1f}")]
    for label, value in rows:
        print(f"{label:<36}{value:>20}")
    if rep.first_error:
        print(f"first error: {rep.first_error}")


# -- servers started by the benchmark -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """A server subprocess, ready once its /v1/models answers; stopped on exit."""

    def __init__(self, name: str, argv: list[str], port: int, timeout: float = 600.0):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        print(f"starting {name}: {shlex.join(argv)} (log: {self.log.name})", flush=True)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{name} exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not come up within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> LaunchedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(name: str, model_path: str, server_args: list[str], context: int) -> LaunchedServer:
    port = free_port()
    if name == "infera":
        argv = [sys.executable, "-m", "infera.cli", "serve", "--model", model_path, "--port", str(port),
                "--served-model-name", "bench", *server_args]
    else:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", "bench",
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
                "--n_threads", str(os.cpu_count() or 1),
                "--interrupt_requests", "False"]  # by default each new request cuts the running one short
    return LaunchedServer(name, argv, port)


def request_bodies(prompts: list[str], model: str, output_len: int, peer: str, eos_ids: set[int]) -> list[dict]:
    base = {"model": model, "max_tokens": output_len, "temperature": 0.0, "stream": True}
    if peer == "llama-cpp":  # no ignore_eos there: forbid the EOS tokens instead
        extra = {"logit_bias": {str(t): -100.0 for t in eos_ids}}
    else:
        extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    return [{**base, **extra, "prompt": p} for p in prompts]


def offline_throughput(model_path: str, server_args: list[str], prompts: list[str], output_len: int) -> float:
    """infera's offline output tokens/s on the same prompts, with the same engine options as the server."""
    from infera import LLM, SamplingParams
    from infera.cli import build_parser, engine_kwargs

    kwargs = engine_kwargs(build_parser().parse_args(["serve", "--model", model_path, *server_args]))
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(o.num_generated_tokens for o in outputs) / elapsed


# -- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infera bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="base URL of a running OpenAI-compatible server")
    p.add_argument("--launch", action="append", choices=["infera", "llama-cpp"], default=[],
                   help="start this server on --model-path, benchmark it, stop it (repeatable)")
    p.add_argument("--model-path", default=None,
                   help="GGUF/HF model for launched servers and the prompt tokenizer (default: the bundled model)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models entry)")
    p.add_argument("--api-key", default=os.environ.get("INFERA_API_KEY"), help="bearer token for --url")
    p.add_argument("--num-requests", type=int, default=64, help="requests to send (default 64)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean arrival rate in requests/s, Poisson (default inf: all at once)")
    p.add_argument("--input-len-range", type=int, nargs=2, default=(128, 512), metavar=("MIN", "MAX"),
                   help="prompt length range in tokens (default 128 512)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request, EOS ignored")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument("--server-args", default="", help="extra `infera serve` options for --launch infera and "
                                                      "--offline, e.g. \"--max-num-seqs 64\"")
    p.add_argument("--offline", action="store_true",
                   help="also run infera offline (LLM.generate) on the same prompts and print served/offline")
    p.add_argument("--save-json", default=None, help="write the reports to this JSON file")
    args = p.parse_args(argv)
    if not args.url and not args.launch:
        p.error("give --url or --launch")
    if args.num_requests < 1 or args.output_len < 1 or not 1 <= args.input_len_range[0] <= args.input_len_range[1]:
        p.error("--num-requests, --output-len and --input-len-range must be positive (MIN <= MAX)")
    return args


def main(argv: list[str] | None = None) -> list[Report]:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if args.model_path is None:
        from infera.loader.model_loader import default_model_path
        args.model_path = str(default_model_path())
    tokenizer = load_tokenizer(args.model_path)
    prompts = build_prompts(tokenizer, args.num_requests, tuple(args.input_len_range), args.output_len, args.seed)
    print(f"machine: {machine()}")
    server_args = shlex.split(args.server_args)
    context = args.input_len_range[1] + args.output_len + 64
    reports: list[Report] = []

    def bench(name: str, url: str, peer: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        bodies = request_bodies(prompts, model, args.output_len, peer, tokenizer.eos_token_ids)
        warm_up = {**bodies[0], "max_tokens": 4, "stream": False}
        warm_up.pop("stream_options", None)
        httpx.post(f"{url}/v1/completions", json=warm_up, headers=headers, timeout=600).raise_for_status()
        rep = asyncio.run(run_load(name, url, bodies, args.request_rate, args.seed, api_key))
        print_report(rep, args.request_rate)
        reports.append(rep)

    if args.url:
        bench(args.url, args.url.rstrip("/"), "openai", args.api_key)
    for name in args.launch:
        if name == "llama-cpp" and not have("llama_cpp"):
            print("\nllama-cpp-python is not installed: skipping the llama.cpp peer "
                  "(pip install 'infera[bench]' to compare)", flush=True)
            continue
        with launch(name, args.model_path, server_args if name == "infera" else [], context) as server:
            bench(name, server.url, name, None)

    by_name = {r.name: r for r in reports}
    if "infera" in by_name and "llama-cpp" in by_name:
        a, b = by_name["infera"], by_name["llama-cpp"]
        print(f"\ninfera / llama-cpp-python server: output tok/s x{a.output_throughput / b.output_throughput:.2f}, "
              f"TTFT p50 x{a.ttft_ms['p50'] / b.ttft_ms['p50']:.2f} (lower is better)")
    offline = None
    if args.offline:
        offline = offline_throughput(args.model_path, server_args, prompts, args.output_len)
        print(f"\ninfera offline (LLM.generate, same prompts): {offline:.1f} output tok/s")
        for rep in reports:
            print(f"{rep.name} served / infera offline: x{rep.output_throughput / offline:.2f}")
    if args.save_json:
        save_json(args.save_json, {"machine": machine(), "reports": [asdict(r) for r in reports],
                                   "offline_output_throughput": offline})
        print(f"\nreports written to {args.save_json}")
    return reports


if __name__ == "__main__":
    main()
