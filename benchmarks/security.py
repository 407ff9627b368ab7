"""Hostile requests against a real `infera serve`: proofs of concept, /health under attack, fuzzing.

Starts `infera serve` on the bundled model (loopback, a free port), then
1. sends the proofs of concept (the classes of tests/test_security.py, modelled on vLLM, llama.cpp,
   SGLang and Ollama advisories) round after round for ``--attack-seconds`` while a thread polls
   /health every 10 ms: each must be refused with its 4xx (or 413/503) in under a second every time;
   reports the time to reject, /health p50/p99/max latency during the attack, the server's memory
   growth, and that an ordinary request succeeds afterwards;
2. runs schemathesis against /openapi.json (every operation, ``--max-examples`` generated cases
   each, positive and negative): counts responses >= 500 and requests that hang.

    python benchmarks/security.py [--max-examples 200] [--save-json docs/security.json]

schemathesis comes with `pip install 'infera[bench]'`; without it step 2 is skipped and says so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import machine, save_json
from serve import LaunchedServer, free_port

MODEL = "bench"
CHAT = [{"role": "user", "content": "Say something about caches."}]
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MARKER = Path(tempfile.gettempdir()) / "infera-security-bench-marker"
CVE_2024_34359 = ("{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch " + str(MARKER)
                  + "') }}")
SERVER_ARGS = ["--max-tokens-default", "16", "--max-tokens-limit", "64", "--request-timeout", "30",
               "--max-request-body-bytes", str(2**20), "--chat-template-timeout", "0.5"]


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, **extra}


def completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **extra}


# (name, advisory it is modelled on, path, body or raw bytes, expected status)
POCS: list[tuple[str, str, str, dict | bytes, int]] = [
    ("schema string nested 100,000 deep", "vLLM CVE-2026-114051 (engine death)", "/v1/completions",
     completion(guided_json="[" * 100_000), 400),
    ("3,000-property object schema", "vLLM CVE-2025-29770 (grammar compile)", "/v1/completions",
     completion(guided_json={"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}),
     400),
    ("20,000-alternative regex", "vLLM CVE-2025-29770", "/v1/completions", completion(guided_regex="(a|b)" * 10_000),
     400),
    ("5,000 choices", "vLLM CVE-2025-29770", "/v1/completions", completion(guided_choice=list(map(str, range(5000)))),
     400),
    ("chat_template in chat_template_kwargs", "vLLM GHSA-69j4-grxj-j64p", "/v1/chat/completions",
     chat(chat_template_kwargs={"chat_template": NESTED_LOOP}), 400),
    ("padding to 10^9 tokens", "vLLM GHSA-x567-49g5-p4cf", "/v1/chat/completions",
     chat(chat_template_kwargs={"padding": "max_length", "max_length": 10**9}), 400),
    ("request chat_template, untrusted server", "vLLM GHSA-69j4-grxj-j64p", "/v1/chat/completions",
     chat(chat_template=NESTED_LOOP), 400),
    ("template payload in a message", "llama-cpp-python CVE-2024-34359", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": CVE_2024_34359}]), 200),
    ("reward model path", "Ollama CVE-2024-39719 (file probing)", "/v1/chat/completions",
     chat(scaling={"method": "best_of_n", "budget": 2, "reward": "model:/etc"}), 400),
    ("backtracking answer_pattern", "ReDoS", "/v1/chat/completions",
     chat(scaling={"method": "self_consistency", "budget": 2, "answer_pattern": r"(a)\1"}), 400),
    ("scaling budget x max_tokens", "unbounded work", "/v1/chat/completions",
     chat(scaling={"method": "self_consistency", "budget": 1024, "max_tokens": 4000}), 400),
    ("300 prompts", "unbounded work", "/v1/completions", completion(prompt=["Hello"] * 300), 400),
    ("n=128 x 9 prompts", "unbounded work", "/v1/completions", completion(prompt=["Hello"] * 9, n=128), 400),
    ("65 stop strings", "unbounded work", "/v1/completions", completion(stop=["x"] * 65), 400),
    ("5,000 stop token ids", "unbounded work", "/v1/completions", completion(stop_token_ids=[1] * 5000), 400),
    ("max_tokens over the limit", "runaway defaults", "/v1/completions", completion(max_tokens=10**6), 400),
    ("2 MiB body", "unbounded body", "/v1/completions", completion(prompt="x" * 2**21), 413),
    ("Host: attacker.example", "DNS rebinding", "/v1/completions", completion(), 400),
]


class HealthProbe(threading.Thread):
    """GET /health every 10 ms; latencies and failures."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.latencies, self.failures = url, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(f"{self.url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                self.stop.wait(0.01)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_pocs(url: str, pid: int, seconds: float) -> dict:
    """Every proof of concept, round after round for ``seconds``, while /health is probed."""
    MARKER.unlink(missing_ok=True)
    rss_before = rss_mib(pid)
    probe = HealthProbe(url)
    probe.start()
    results: dict[str, list] = {name: [] for name, *_ in POCS}
    rounds = 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while rounds == 0 or time.monotonic() < deadline:
            for name, _, path, body, expected in POCS:
                headers = {"Host": "attacker.example"} if name.startswith("Host") else {}
                started = time.perf_counter()
                r = client.post(f"{url}{path}", json=body, headers=headers)
                message = r.json()["error"]["message"] if r.status_code >= 400 else ""
                results[name].append((r.status_code == expected, time.perf_counter() - started, r.status_code,
                                      message))
            rounds += 1
        normal = client.post(f"{url}/v1/completions", json=completion(max_tokens=8, ignore_eos=True))
    probe.stop.set()
    probe.join()
    rows = []
    for name, advisory, _, _, expected in POCS:
        runs = results[name]
        passed = all(ok for ok, *_ in runs) and max(t for _, t, *_ in runs) < 1.0
        rows.append({"poc": name, "advisory": advisory, "expected": expected, "status": runs[0][2],
                     "passed": passed, "max_seconds": round(max(t for _, t, *_ in runs), 4),
                     "median_seconds": round(statistics.median(t for _, t, *_ in runs), 4),
                     "message": runs[0][3][:120]})
        print(f"{'PASS' if passed else 'FAIL'}  {name:40s} {runs[0][2]} in {rows[-1]['median_seconds'] * 1000:6.1f} ms "
              f"(max {rows[-1]['max_seconds'] * 1000:6.1f})  {runs[0][3][:60]}", flush=True)
    lat = sorted(probe.latencies)
    return {
        "pocs": rows, "passed": sum(r["passed"] for r in rows), "total": len(rows), "rounds": rounds,
        "max_reject_seconds": max(r["max_seconds"] for r in rows),
        "health_probes": len(lat), "health_failures": probe.failures,
        "health_p50_ms": round(1000 * statistics.median(lat), 2),
        "health_p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2), "health_max_ms": round(1000 * lat[-1], 2),
        "memory_growth_mib": round(rss_mib(pid) - rss_before, 1),
        "normal_request_after": normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] == 8,
        "template_payload_ran": MARKER.exists(),
    }


def run_schemathesis(url: str, max_examples: int, timeout: float) -> dict:
    exe = shutil.which("schemathesis") or str(Path(__import__("sys").executable).parent / "schemathesis")
    if not Path(exe).exists():
        print("schemathesis is not installed (pip install 'infera[bench]'): fuzzing skipped")
        return {"skipped": True}
    report = Path(tempfile.mkdtemp()) / "st.ndjson"
    argv = [exe, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
            str(max_examples), "--request-timeout", str(timeout), "--report", "ndjson",
            "--report-ndjson-path", str(report), "--continue-on-failure", "--suppress-health-check", "all",
            "--seed", "0"]
    print("running", " ".join(argv), flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    print("\n".join(proc.stdout.strip().splitlines()[-12:]))
    statuses: dict[str, int] = {}
    cases = server_errors = hangs = failed_checks = 0
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if scenario is None:
            continue
        recorder = scenario["recorder"]
        for interaction in recorder.get("interactions", {}).values():
            cases += 1
            response = interaction.get("response")
            if response is None:  # no response within --request-timeout
                hangs += 1
                continue
            code = response["status_code"]
            statuses[str(code)] = statuses.get(str(code), 0) + 1
            server_errors += code >= 500
        failed_checks += sum(c["status"] == "failure" for checks in recorder.get("checks", {}).values() for c in checks)
    return {"cases": cases, "statuses": dict(sorted(statuses.items())), "responses_5xx": server_errors,
            "no_response": hangs, "failed_checks": failed_checks, "seconds": round(time.monotonic() - started, 1),
            "exit_code": proc.returncode, "max_examples": max_examples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF or HF directory (default: the bundled model)")
    p.add_argument("--max-examples", type=int, default=200, help="schemathesis cases per operation (default 200)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds before a fuzzing request counts as hung (default 60)")
    p.add_argument("--attack-seconds", type=float, default=20.0,
                   help="repeat the proofs of concept for this long while /health is probed (default 20)")
    p.add_argument("--save-json", default=None, help="write the results here")
    args = p.parse_args()
    from infera.loader.model_loader import default_model_path

    model = args.model or str(default_model_path())
    port = free_port()
    argv = [__import__("sys").executable, "-m", "infera.cli", "serve", "--model", model, "--port", str(port),
            "--served-model-name", MODEL, *SERVER_ARGS]
    with LaunchedServer("infera", argv, port) as server:
        attack = run_pocs(server.url, server.proc.pid, args.attack_seconds)
        print(f"\nproofs of concept: {attack['passed']}/{attack['total']} passed ({attack['rounds']} rounds), "
              f"slowest rejection "
              f"{attack['max_reject_seconds'] * 1000:.0f} ms; /health p50 {attack['health_p50_ms']} ms, "
              f"p99 {attack['health_p99_ms']} ms, max {attack['health_max_ms']} ms over {attack['health_probes']} "
              f"probes ({attack['health_failures']} failed); memory growth {attack['memory_growth_mib']} MiB; "
              f"ordinary request afterwards {'ok' if attack['normal_request_after'] else 'FAILED'}; template "
              f"payload ran: {attack['template_payload_ran']}", flush=True)
        fuzz = run_schemathesis(server.url, args.max_examples, args.request_timeout)
        if not fuzz.get("skipped"):
            print(f"schemathesis: {fuzz['cases']} cases in {fuzz['seconds']} s, statuses {fuzz['statuses']}; "
                  f"{fuzz['responses_5xx']} responses >= 500, {fuzz['no_response']} without a response")
        alive = httpx.get(f"{server.url}/health").status_code == 200
        print(f"server alive at the end: {alive}")
    save_json(args.save_json, {"machine": machine(), "server_args": SERVER_ARGS, "attack": attack, "fuzz": fuzz,
                               "alive_at_end": alive})


if __name__ == "__main__":
    main()
