"""`infera serve` as users start it: a subprocess with an API key and a bounded waiting queue."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from infera.cli import main

KEY = "sekrit"


class ServeProcess:
    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not (m := re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log)):
            assert self.proc.poll() is None, f"infera serve exited:\n{self.log}"
            assert time.monotonic() < deadline, f"infera serve did not start:\n{self.log}"
            time.sleep(0.05)
        self.url = m.group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def serve(tiny_model) -> Iterator[ServeProcess]:
    proc = ServeProcess([sys.executable, "-m", "infera.cli", "serve", "--model", str(tiny_model("llama")),
                         "--dtype", "float32", "--kv-cache-memory", "32MiB", "--port", "0", "--api-key", KEY,
                         "--max-waiting-requests", "1", "--max-num-seqs", "1", "--served-model-name", "tiny"])
    yield proc
    proc.stop()


def client(serve: ServeProcess, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{serve.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_startup_log_names_model_dtype_kv_cache_and_address(serve, tiny_model):
    log = serve.log
    assert str(tiny_model("llama")) in log and "float32" in log
    assert re.search(r"KV cache \d+ tokens", log)
    assert f"curl {serve.url}/v1/chat/completions" in log and "Authorization: Bearer" in log


def test_api_key_required(serve):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{serve.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{serve.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401  # the key is checked before anything else
    assert httpx.get(f"{serve.url}/health").status_code == 200
    assert httpx.get(f"{serve.url}/metrics").status_code == 200

    async def calls() -> None:
        async with client(serve, "wrong") as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        async with client(serve) as good:
            assert [m.id for m in (await good.models.list()).data] == ["tiny"]

    asyncio.run(calls())


def test_full_waiting_queue_answers_503(serve):
    headers = {"Authorization": f"Bearer {KEY}"}

    async def waiting(http: httpx.AsyncClient) -> float:
        text = (await http.get(f"{serve.url}/metrics")).text
        return float(re.search(r"^infera:num_requests_waiting\{.*\} (\S+)$", text, re.M).group(1))

    async def scenario() -> None:
        async with client(serve) as api, httpx.AsyncClient(headers=headers) as http:
            # one sequence runs at a time: A runs, B waits, C finds the queue full
            a = await api.completions.create(model="tiny", prompt="A", max_tokens=1500, stream=True,
                                             extra_body={"ignore_eos": True})
            await a.__aiter__().__anext__()
            b = asyncio.create_task(api.completions.create(model="tiny", prompt="B", max_tokens=2,
                                                           extra_body={"ignore_eos": True}))
            deadline = time.monotonic() + 30
            while await waiting(http) < 1:
                assert time.monotonic() < deadline, "B never queued"
                await asyncio.sleep(0.05)
            with pytest.raises(openai.APIStatusError) as e:
                await api.completions.create(model="tiny", prompt="C", max_tokens=2)
            assert e.value.status_code == 503 and e.value.body["code"] == "server_overloaded"
            assert e.value.response.headers["retry-after"] == "1"
            await a.close()  # A's client leaves: B runs
            assert (await b).usage.completion_tokens == 2

    asyncio.run(scenario())


def test_serve_bad_options_one_line_error(capsys):
    assert main(["serve", "--model", "/nonexistent/model.gguf"]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("infera serve: error:") for line in err)
