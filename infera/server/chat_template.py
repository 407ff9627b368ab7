"""Chat templates rendered in a worker process, with a time limit and a memory limit.

A chat template is Jinja code from the model file (GGUF files from anywhere carry one, cf.
CVE-2024-34359) or from a client.  transformers renders it in jinja2's
``ImmutableSandboxedEnvironment``, which stops attribute escapes to Python, but not a nested loop
that runs for hours nor ``{{ 'x' * 10**10 }}``.  So :class:`ChatTemplateRenderer` has transformers'
own ``render_jinja_template`` (the function ``apply_chat_template`` calls, with the same arguments)
render it in a child process that imports only that (no torch), under an address-space limit
(``RLIMIT_AS``), and kills the child when a render overruns its time.  Requests and replies cross
the pipe as JSON lines, never pickles: the worker is no more trusted than the template it runs.
Variables a client adds to the template go through :func:`check_template_kwargs`.

This file is also the worker's program: ``python -P chat_template.py MEMORY_BYTES``, run as a
script so that it never imports the ``infera`` package (and torch with it).
"""
from __future__ import annotations

import asyncio
import codecs
import json
import os
import re
import resource
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from infera.loader.tokenizer import Tokenizer

MAX_TEMPLATE_KWARGS = 32
MAX_TEMPLATE_KWARG_CHARS = 4096
_KWARG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
# parameters of transformers' apply_chat_template, render_jinja_template and tokenizer call, the
# variables and globals every template sees, and the model's special tokens (also any *_token(s))
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "text", "text_pair",
    "add_special_tokens", "stride", "is_split_into_words", "pad_to_multiple_of", "padding_side",
    "return_token_type_ids", "return_attention_mask", "return_overflowing_tokens", "return_special_tokens_mask",
    "return_offsets_mapping", "return_length", "verbose", "split_special_tokens", "raise_exception",
    "strftime_now", "namespace", "dict", "range", "lipsum", "cycler", "joiner", "bos_token", "eos_token",
    "unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "additional_special_tokens",
})
T = TypeVar("T")
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # numpy is imported


def load_chat_template(template: str | None) -> str | None:
    """``--chat-template``: the text of the file it names, or else the template itself when it looks like
    one (it has ``{``, ``}`` or a newline; escapes such as ``\\n`` decoded), as vLLM reads it.  ValueError
    for what looks like a path that cannot be read."""
    if template is None:
        return None
    try:
        with open(template, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as e:
        if not any(c in template for c in "{}\n"):
            raise ValueError(f"--chat-template {template!r} looks like a file path, but it cannot be read ({e})"
                             ) from None
    return codecs.decode(template.encode("latin-1", "backslashreplace"), "unicode_escape")


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A client's ``chat_template_kwargs``, allowed only as extra template variables: at most
    :data:`MAX_TEMPLATE_KWARGS` identifier names, none reserved, each a JSON scalar (strings of at
    most :data:`MAX_TEMPLATE_KWARG_CHARS` characters).  ValueError names the first refused key."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"chat_template_kwargs has {len(kwargs)} keys; at most {MAX_TEMPLATE_KWARGS} are allowed")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _KWARG_NAME.match(key):
            raise ValueError(f"chat_template_kwargs: {str(key)[:64]!r} is not a name (letters, digits and _, "
                             f"at most 64 characters)")
        if key in RESERVED_TEMPLATE_KWARGS or key.endswith(("_token", "_tokens")):
            raise ValueError(f"chat_template_kwargs: {key!r} is not allowed")
        if value is not None and type(value) not in (bool, int, float, str):
            raise ValueError(f"chat_template_kwargs: {key!r} must be null, a boolean, a number or a string")
        if isinstance(value, str) and len(value) > MAX_TEMPLATE_KWARG_CHARS:
            raise ValueError(f"chat_template_kwargs: {key!r} is longer than {MAX_TEMPLATE_KWARG_CHARS} characters")
    return dict(kwargs)


class ChatTemplateRenderer:
    """Renders chat templates for one model's tokenizer in a single worker process.  Renders run
    one at a time on a thread of their own (a render waits for those before it), so that the
    async methods are safe from any number of tasks.  :meth:`close` stops the worker."""

    def __init__(self, tokenizer: Tokenizer, timeout_s: float = 5.0, memory_bytes: int = 1 << 30,
                 max_chars: int = 1 << 22, startup_timeout_s: float = 60.0):
        """``timeout_s``: the time a render may take; ``memory_bytes``: the worker's address space
        (its imports take about 140 MB of it); ``max_chars``: the longest rendered prompt allowed;
        ``startup_timeout_s``: the time the worker may take to import transformers.  The worker
        starts now, in the background."""
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_chars = max_chars
        self.startup_timeout_s = startup_timeout_s
        self._special_tokens = dict(tokenizer.hf.special_tokens_map)  # template variables, as transformers passes
        json.dumps(self._special_tokens)  # they cross the pipe as JSON
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-template")
        self._worker: _Worker | None = _Worker(memory_bytes)
        self._closed = False

    async def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                     template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None,
                     tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text: the model's chat template (or ``chat_template``, a template or the name
        of one of the model's) applied to ``messages`` and ``tools`` (OpenAI's tool objects, the
        template's ``tools`` as apply_chat_template passes them).  ValueError for every failure a
        request causes."""
        return await self._run(self._render, messages, add_generation_prompt, template_kwargs, chat_template, tools)

    async def render_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None,
                         tools: list[dict[str, Any]] | None = None) -> list[int]:
        """:meth:`render`'s text as token ids, encoded as transformers' ``apply_chat_template`` does
        (without added special tokens: the template writes them)."""
        return await self._run(self._render_ids, messages, add_generation_prompt, template_kwargs, chat_template,
                               tools)

    def close(self) -> None:
        """Stop the worker; renders after this raise RuntimeError.  A render under way ends (its
        worker is killed) before this returns: only the renderer's thread touches the pipes."""
        self._closed = True
        if self._worker is not None:
            self._worker.proc.kill()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the renderer's thread."""
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the chat template renderer is closed")

    def _render_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None, chat_template: str | None,
                    tools: list[dict[str, Any]] | None) -> list[int]:
        text = self._render(messages, add_generation_prompt, template_kwargs, chat_template, tools)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None, chat_template: str | None,
                tools: list[dict[str, Any]] | None = None) -> str:
        self._check_open()  # a render queued before close() may start after it
        if chat_template is None and not self.tokenizer.hf.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        request = {"template": self.tokenizer.hf.get_chat_template(chat_template), "messages": messages, "tools": tools,
                   "add_generation_prompt": add_generation_prompt, "max_chars": self.max_chars,
                   "variables": {**self._special_tokens, **check_template_kwargs(template_kwargs)}}
        try:
            line = json.dumps(request).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"cannot apply the chat template: the messages are not JSON ({e})") from None
        if self._worker is None or not self._worker.alive():  # e.g. killed by the OS while idle
            self._worker = _Worker(self.memory_bytes)
        worker = self._worker
        worker.wait_ready(self.startup_timeout_s)
        try:
            reply = worker.request(line, self.timeout_s, max_bytes=6 * self.max_chars + 4096)
        except TimeoutError:
            self._replace_worker()
            raise ValueError(f"the chat template did not render within {self.timeout_s:g} s") from None
        except (EOFError, OSError, ValueError, RecursionError) as e:  # it died, or broke the protocol
            self._replace_worker()
            raise ValueError(f"cannot apply the chat template: its worker process failed ({e})") from None
        if "error" in reply:
            raise ValueError(f"cannot apply the chat template: {reply['error']}")
        return reply["text"]

    def _replace_worker(self) -> None:
        """Kill the worker and start the next one, which imports while nothing waits for it."""
        if self._worker is not None:
            self._worker.kill()
        self._worker = None if self._closed else _Worker(self.memory_bytes)


class _Worker:
    """One worker process and its pipes (used from one thread at a time)."""

    def __init__(self, memory_bytes: int):
        self.proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), str(memory_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **_WORKER_ENV})
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the worker has imported transformers and set its limit (RuntimeError if it can't)."""
        if self.ready:
            return
        try:
            self.ready = self._read(time.monotonic() + timeout_s, 4096) == {"ready": True}
        except (TimeoutError, EOFError, OSError, ValueError):
            pass
        if not self.ready:
            self.kill()
            raise RuntimeError(f"the chat template worker did not start within {timeout_s:g} s "
                               f"(exit code {self.proc.returncode}; its errors are on stderr)")

    def request(self, line: bytes, timeout_s: float, max_bytes: int) -> dict[str, Any]:
        """Send one request; its reply (TimeoutError after ``timeout_s``, EOFError if the worker died)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        reply = self._read(time.monotonic() + timeout_s, max_bytes)
        if not isinstance(reply, dict) or not (isinstance(reply.get("text"), str) or
                                               isinstance(reply.get("error"), str)):
            raise ValueError("malformed reply")
        return reply

    def _read(self, deadline: float, max_bytes: int) -> Any:
        """One JSON line from the worker, which writes nothing after it until the next request."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks: list[bytes] = []
        size = 0
        while not chunks or not chunks[-1].endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"it ended with exit code {self.proc.wait()}")
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"reply longer than {max_bytes} bytes")
        return json.loads(b"".join(chunks))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # a broken pipe's unflushed bytes
                    pass


# -- the worker process ---------------------------------------------------------------------------
def _serve(memory_bytes: int) -> None:
    """One JSON request a line on stdin, one JSON reply a line on stdout: ``{"text": ...}`` or
    ``{"error": ...}`` (a one-line message)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else prints goes to stderr, not among the replies
    from transformers.utils.chat_template_utils import render_jinja_template

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    replies.write(b'{"ready": true}\n')
    replies.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            # apply_chat_template drops None values first; the special tokens are among the variables
            messages = [{k: v for k, v in m.items() if v is not None} for m in request["messages"]]
            rendered, _ = render_jinja_template(conversations=[messages], tools=request["tools"],
                                                chat_template=request["template"],
                                                add_generation_prompt=request["add_generation_prompt"],
                                                **request["variables"])
            text = rendered[0]
            if len(text) > request["max_chars"]:
                raise ValueError(f"the prompt is longer than {request['max_chars']} characters")
            reply = {"text": text}
        except MemoryError:
            reply = {"error": "the template ran out of memory"}
        except Exception as e:  # a template's errors are the client's: tell it what they were
            reply = {"error": " ".join(str(e).split())[:500] or type(e).__name__}
        replies.write(json.dumps(reply).encode() + b"\n")  # ASCII: \uXXXX for any character
        replies.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
