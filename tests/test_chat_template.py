"""infera.server.chat_template: chat templates rendered in a worker process with a time and a
memory limit give transformers' token ids exactly; hostile templates and template variables are
refused in bounded time, without running anything, and the renderer works on afterwards."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import gguf
import pytest

from infera.loader import model_store
from infera.loader.gguf_file import GGUFFile
from infera.loader.tokenizer import Tokenizer
from infera.server.chat_template import MAX_TEMPLATE_KWARGS, ChatTemplateRenderer, check_template_kwargs

TIMEOUT_S = 1.0
SLACK_S = 2.0  # a refusal's time beyond TIMEOUT_S: killing the worker, a loaded machine

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass?"}],
    [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🦙, RTL עברית, \t tabs\nand newlines"},
     {"role": "assistant", "content": "ok", "tool_calls": None}],  # None values are dropped, as transformers does
]
# uses a template variable and a special token, which the renderer passes as transformers does
THINKING_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
                     "{% endif %}{% endif %}")
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MEMORY_BOMBS = [
    "{{ 'x' * 10**10 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
]


def cve_payloads(marker: Path) -> list[str]:
    """CVE-2024-34359's template (llama-cpp-python) and the subclass-walking variant, each of which
    would create ``marker`` if it ran."""
    return [
        f"{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}') }}}}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}{{% endfor %}}",
    ]


def tokenizer_of(file: GGUFFile) -> Tokenizer:
    return Tokenizer(file.tokenizer_dir(), file.config())


@pytest.fixture(scope="module")
def bundled(bundled_model_path: Path) -> GGUFFile:
    return GGUFFile(bundled_model_path)


@pytest.fixture(scope="module")
def tokenizer(bundled: GGUFFile) -> Tokenizer:
    return tokenizer_of(bundled)


@pytest.fixture(scope="module")
def renderer(tokenizer: Tokenizer):
    r = ChatTemplateRenderer(tokenizer, timeout_s=TIMEOUT_S, memory_bytes=512 << 20, max_chars=100_000)
    yield r
    r.close()


def render(r: ChatTemplateRenderer, messages=CONVERSATIONS[0], **kwargs) -> str:
    return asyncio.run(r.render(messages, **kwargs))


def render_ids(r: ChatTemplateRenderer, messages, **kwargs) -> list[int]:
    return asyncio.run(r.render_ids(messages, **kwargs))


def refusal(r: ChatTemplateRenderer, template: str) -> tuple[str, float]:
    """The ValueError message for ``template`` and the time it took, timed from a ready worker."""
    assert render(r).endswith("<|im_start|>assistant\n")  # the worker is up (a new one may just have started)
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        render(r, chat_template=template)
    return str(e.value), time.monotonic() - start


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class BusyRender:
    """A render of :data:`NESTED_LOOP` on a thread of its own, known to be under way: this waits
    until the worker has spent 0.2 s of CPU time on it."""

    def __init__(self, r: ChatTemplateRenderer):
        render(r)  # a ready worker, idle
        pid = r._worker.proc.pid
        idle = cpu_seconds(pid)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(r,))
        self._thread.start()
        deadline = time.monotonic() + 30.0
        while cpu_seconds(pid) < idle + 0.2:
            assert time.monotonic() < deadline and self._thread.is_alive(), "the render never got under way"
            time.sleep(0.01)

    def _run(self, r: ChatTemplateRenderer) -> None:
        try:
            render(r, chat_template=NESTED_LOOP)
        except BaseException as e:
            self._error = e

    def error(self) -> BaseException | None:
        """What the render raised (a ValueError expected), once it has ended."""
        self._thread.join(timeout=10.0)
        assert not self._thread.is_alive(), "the render did not end"
        return self._error


def assert_still_renders(r: ChatTemplateRenderer, tokenizer: Tokenizer) -> None:
    messages = CONVERSATIONS[1]
    assert render_ids(r, messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# -- the same ids as transformers ------------------------------------------------------------------
def check_identity(r: ChatTemplateRenderer, tokenizer: Tokenizer) -> None:
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert render_ids(r, messages, add_generation_prompt=add_generation_prompt) == expected
            text = render(r, messages, add_generation_prompt=add_generation_prompt)
            assert text == tokenizer.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                            tokenize=False)
    for thinking in (True, False):
        messages = CONVERSATIONS[1]
        expected = tokenizer.apply_chat_template(messages, chat_template=THINKING_TEMPLATE, enable_thinking=thinking)
        got = render_ids(r, messages, template_kwargs={"enable_thinking": thinking}, chat_template=THINKING_TEMPLATE)
        assert got == expected
        text = render(r, messages, template_kwargs={"enable_thinking": thinking}, chat_template=THINKING_TEMPLATE)
        assert text.startswith(tokenizer.hf.bos_token) and ("<think>" in text) is not thinking


def test_ids_equal_transformers_bundled_model(renderer: ChatTemplateRenderer, tokenizer: Tokenizer):
    check_identity(renderer, tokenizer)


def test_ids_equal_transformers_qwen():
    path = model_store.cached_path("qwen2.5-coder-0.5b")
    if not path.is_file():
        pytest.skip(f"{path} is not downloaded (make models)")
    tokenizer = tokenizer_of(GGUFFile(path))  # reading its metadata takes seconds
    r = ChatTemplateRenderer(tokenizer, timeout_s=TIMEOUT_S)
    try:
        check_identity(r, tokenizer)
        assert "You are Qwen" in render(r)  # the model's own template, not the bundled one's
    finally:
        r.close()


def test_concurrent_renders(renderer: ChatTemplateRenderer, tokenizer: Tokenizer):
    """Renders from many tasks at once each get their own prompt; a hostile one among them fails alone."""
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(12)]

    async def main():
        jobs = [renderer.render_ids(c) for c in conversations]
        jobs.insert(5, renderer.render(CONVERSATIONS[0], chat_template=NESTED_LOOP))
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results.pop(5), ValueError)
    assert results == [tokenizer.apply_chat_template(c) for c in conversations]


def test_no_chat_template(renderer: ChatTemplateRenderer, monkeypatch):
    monkeypatch.setattr(renderer.tokenizer.hf, "chat_template", None)
    with pytest.raises(ValueError, match="this model has no chat template; send a plain prompt instead"):
        render(renderer)
    assert render(renderer, chat_template="{{ messages[0].content }}!") == "Hello!!"


def test_prompt_longer_than_max_chars(renderer: ChatTemplateRenderer, tokenizer: Tokenizer):
    with pytest.raises(ValueError, match="longer than 100000 characters"):
        render(renderer, chat_template="{{ 'x' * 100001 }}")
    assert len(render(renderer, chat_template="{{ 'x' * 100000 }}")) == 100_000
    assert_still_renders(renderer, tokenizer)


def test_template_errors_are_value_errors(renderer: ChatTemplateRenderer, tokenizer: Tokenizer):
    with pytest.raises(ValueError, match="cannot apply the chat template: roles must alternate"):
        render(renderer, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="cannot apply the chat template: Expected an expression"):
        render(renderer, chat_template="{% for %}")
    assert_still_renders(renderer, tokenizer)


def test_closed_renderer(tokenizer: Tokenizer):
    r = ChatTemplateRenderer(tokenizer)
    worker = r._worker.proc
    r.close()
    assert worker.poll() is not None
    with pytest.raises(RuntimeError, match="closed"):
        render(r)


def test_close_ends_a_render_under_way(tokenizer: Tokenizer):
    r = ChatTemplateRenderer(tokenizer, timeout_s=30.0)
    busy = BusyRender(r)
    start = time.monotonic()
    r.close()
    assert time.monotonic() - start < 5.0  # not the 30 s timeout
    assert "its worker process failed" in str(busy.error())


# -- hostile templates -----------------------------------------------------------------------------
def test_nested_loop_times_out(renderer: ChatTemplateRenderer, tokenizer: Tokenizer):
    old = renderer._worker.proc
    message, elapsed = refusal(renderer, NESTED_LOOP)
    assert message == f"the chat template did not render within {TIMEOUT_S:g} s"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S
    assert old.poll() is not None  # killed
    assert_still_renders(renderer, tokenizer)


@pytest.mark.parametrize("template", MEMORY_BOMBS, ids=["repeat", "doubling"])
def test_memory_bomb_fails_fast(renderer: ChatTemplateRenderer, tokenizer: Tokenizer, template: str):
    message, elapsed = refusal(renderer, template)
    assert message == "cannot apply the chat template: the template ran out of memory"
    assert elapsed < TIMEOUT_S  # refused at the limit, neither swapping nor timed out
    assert_still_renders(renderer, tokenizer)


@pytest.mark.parametrize("index", [0, 1], ids=["globals", "subclasses"])
def test_cve_2024_34359_payload_does_not_run(renderer: ChatTemplateRenderer, tokenizer: Tokenizer,
                                             tmp_path: Path, index: int):
    marker = tmp_path / "pwned"
    message, elapsed = refusal(renderer, cve_payloads(marker)[index])
    assert "is unsafe" in message  # jinja2's SecurityError
    assert elapsed < TIMEOUT_S
    assert not marker.exists()
    assert_still_renders(renderer, tokenizer)


def test_worker_killed_mid_render(tokenizer: Tokenizer):
    """A worker the OS kills is a ValueError for its render, and replaced."""
    r = ChatTemplateRenderer(tokenizer, timeout_s=30.0)
    try:
        busy = BusyRender(r)
        os.kill(r._worker.proc.pid, signal.SIGKILL)
        assert str(busy.error()) == ("cannot apply the chat template: its worker process failed "
                                     "(it ended with exit code -9)")
        assert_still_renders(r, tokenizer)
        os.kill(r._worker.proc.pid, signal.SIGKILL)  # while idle: replaced before the next render
        r._worker.proc.wait()
        assert_still_renders(r, tokenizer)
    finally:
        r.close()


def test_gguf_with_cve_payload_loads_and_renders_nothing(bundled: GGUFFile, tmp_path: Path, monkeypatch):
    """A GGUF file whose ``tokenizer.chat_template`` is the CVE-2024-34359 payload (the bundled
    model's metadata, its vocabulary cut to the first 1000 tokens so that it converts fast, and no
    tensors): its tokenizer converts and loads, and rendering refuses, running nothing."""
    monkeypatch.setenv("INFERA_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    fields = {key: field for key, field in bundled.reader.fields.items() if not key.startswith("GGUF.")}
    tokens = fields["tokenizer.ggml.tokens"].contents()[:1000]
    vocab = set(tokens)
    cut = {"tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": fields["tokenizer.ggml.token_type"].contents()[:1000],
           "tokenizer.ggml.merges": [m for m in fields["tokenizer.ggml.merges"].contents()
                                     if m.replace(" ", "") in vocab and set(m.split(" ")) <= vocab],
           "tokenizer.chat_template": cve_payloads(marker)[0]}
    path = tmp_path / "evil.gguf"
    writer = gguf.GGUFWriter(str(path), bundled.arch)
    for key, field in fields.items():
        if key != "general.architecture":
            writer.add_key_value(key, cut.get(key, field.contents()), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tokenizer = tokenizer_of(GGUFFile(path))
    assert tokenizer.hf.chat_template == cve_payloads(marker)[0] and tokenizer.vocab_size == 1000
    r = ChatTemplateRenderer(tokenizer, timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(ValueError, match="access to attribute '__init__' .* is unsafe"):
            render(r)
    finally:
        r.close()
    assert not marker.exists()


# -- template variables from clients ---------------------------------------------------------------
@pytest.mark.parametrize("key", ["chat_template", "padding", "max_length", "tokenize", "truncation",
                                 "return_tensors", "tokenizer_kwargs", "add_generation_prompt", "messages",
                                 "tools", "bos_token", "eos_token", "image_token", "additional_special_tokens"])
def test_reserved_kwargs_refused(key: str):
    with pytest.raises(ValueError, match=f"'{key}' is not allowed"):
        check_template_kwargs({"enable_thinking": True, key: "x"})


@pytest.mark.parametrize("kwargs, error", [
    ({"enable_thinking": {"nested": 1}}, "'enable_thinking' must be null, a boolean, a number or a string"),
    ({"documents_list": [1, 2]}, "must be null"),
    ({"reasoning_effort": "x" * 4097}, "'reasoning_effort' is longer than 4096 characters"),
    ({f"k{i}": i for i in range(MAX_TEMPLATE_KWARGS + 1)}, "has 33 keys"),
    ({"__class__": 1}, "is not a name"),
    ({"a-b": 1}, "is not a name"),
    ({"x" * 65: 1}, "is not a name"),
    ({1: 1}, "is not a name"),
])
def test_bad_kwargs_refused(kwargs: dict, error: str):
    with pytest.raises(ValueError, match=error):
        check_template_kwargs(kwargs)


def test_good_kwargs_pass():
    kwargs = {"enable_thinking": False, "thinking": True, "reasoning_effort": "high", "temperature_hint": 0.5,
              "max_turns": 3, "persona": None, "note": "x" * 4096}
    assert check_template_kwargs(kwargs) == kwargs
    assert check_template_kwargs(None) == {}
    assert check_template_kwargs({f"k{i}": i for i in range(MAX_TEMPLATE_KWARGS)})


def test_renderer_checks_kwargs(renderer: ChatTemplateRenderer):
    with pytest.raises(ValueError, match="'eos_token' is not allowed"):
        render(renderer, template_kwargs={"eos_token": "</s>"})
