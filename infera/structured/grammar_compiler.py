"""Structured-output constraints -> xgrammar compiled grammars, validated up front and
compiled off the engine loop.

``submit`` checks the constraint against the bounds (``bounds``) and parses it (JSON schema,
regex, EBNF, choice) into an ``xgrammar.Grammar`` synchronously: that is where every user error
shows up (a ValueError), so a bad request fails before any token is generated, and it takes
milliseconds at most.  It then compiles the grammar against the vocabulary (token-mask
precomputation, the expensive part) in a worker thread and returns a future; xgrammar releases
the GIL while it compiles, so running sequences keep decoding meanwhile.

Compiled grammars are cached by content, least recently used first out, within ``cache_size``
entries and ``cache_bytes`` bytes (each finished entry's compiled size plus its key text).  The
cache takes calls from several threads (the server pre-compiles while the engine thread adds
requests): one lock guards it, and one constraint is compiled once however many threads submit
it.  A compile that fails is dropped from the cache, so the next request for it compiles again.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xgrammar as xgr

from infera.sampling_params import StructuredOutputParams
from infera.structured.bounds import (check_choices, check_grammar_text, check_schema_size, check_schema_text,
                                      check_schema_value)

CACHE_BYTES = 256 * 1024 * 1024

_XGR_PREFIX = re.compile(r"^\s*(\[[\d:]+\]\s*)?(\S+\.(cc|h):\d+:\s*)?(Check failed: .*? is false: )?")


def constraint_key(params: StructuredOutputParams) -> tuple[str, str]:
    """The cache key of a constraint: its kind and its canonical text.  ValueError if it is over
    a bound (checked before it is parsed) or is not valid JSON."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            check_schema_text(schema)  # json.loads recurses: the nesting is bounded first
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured output json: the schema is not valid JSON ({e})") from None
        else:
            check_schema_value(schema)
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured output json: the schema must be a JSON object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, separators=(",", ":"))  # key order matters: it is the output order
        except (TypeError, ValueError) as e:
            raise ValueError(f"structured output json: the schema is not JSON ({e})") from None
        check_schema_size(text)  # escapes can make the compact form longer than the text given
        return "json", text
    if params.json_object:
        return "json", '{"type":"object"}'
    if params.regex is not None:
        check_grammar_text("regex", params.regex)
        return "regex", params.regex
    if params.grammar is not None:
        check_grammar_text("grammar", params.grammar)
        return "grammar", params.grammar
    if params.structural_tag is not None:
        check_schema_text(params.structural_tag)  # it embeds JSON schemas: their bounds apply
        return "structural_tag", params.structural_tag
    check_choices(params.choice)
    return "choice", json.dumps(params.choice)


def parse_grammar(kind: str, text: str) -> xgr.Grammar:
    """Parse a constraint into an xgrammar Grammar; ValueError names what is wrong."""
    try:
        if kind == "json":
            # compact separators and no free whitespace: small models otherwise loop on newlines
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(text)
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(text)
        choices = json.loads(text)
        # EBNF string literals take JSON's escapes, so json.dumps quotes each choice exactly
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    except (RuntimeError, ValueError, TypeError) as e:
        name = {"json": "json schema", "regex": "regex", "grammar": "grammar", "choice": "choice",
                "structural_tag": "structural tag"}[kind]
        raise ValueError(f"structured output {name} is invalid: {_clean(str(e))}") from None


def _clean(message: str) -> str:
    """xgrammar's C++ errors, without the timestamp, source location and check text."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return _XGR_PREFIX.sub("", first, count=1).strip() or first


class CompileQueueFullError(RuntimeError):
    """Too many grammars are compiling to queue another (the caller should retry later)."""


class GrammarCompiler:
    """One per engine: the tokenizer's xgrammar view, the compile threads and the cache."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256,
                 cache_bytes: int = CACHE_BYTES, max_threads: int = 2):
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                                 stop_token_ids=self.stop_token_ids)
        # our cache holds the results; xgrammar's own cache would keep a second copy
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="infera-grammar")
        self.cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.entry_bytes: dict[tuple[str, str], int] = {}  # the size of each compiled entry in the cache
        self.cached_bytes = 0  # their total
        self._lock = threading.Lock()

    def submit(self, params: StructuredOutputParams, max_pending: int | None = None) -> Future[xgr.CompiledGrammar]:
        """Validate ``params`` now (ValueError if bad) and return its compiled grammar's future.
        ``max_pending``: refuse (CompileQueueFullError) a new compile while this many are unfinished."""
        key = constraint_key(params)
        with self._lock:
            future = self._lookup(key)
        if future is not None:
            return future
        grammar = parse_grammar(*key)  # outside the lock: other threads' cache hits need not wait
        with self._lock:
            future = self._lookup(key)  # another thread may have submitted it meanwhile
            if future is None:
                pending = sum(not f.done() for f in self.cache.values())
                if max_pending is not None and pending >= max_pending:
                    raise CompileQueueFullError(f"the server is busy compiling {pending} grammars; retry later")
                future = Future()
                self.cache[key] = future
                self._evict()
                self.executor.submit(self._compile, key, grammar, future)
        return future

    def _lookup(self, key: tuple[str, str]) -> Future[xgr.CompiledGrammar] | None:
        future = self.cache.get(key)
        if future is not None:
            self.cache.move_to_end(key)
        return future

    def _compile(self, key: tuple[str, str], grammar: xgr.Grammar, future: Future[xgr.CompiledGrammar]) -> None:
        """In a compile thread: compile, account for the result in the cache (or drop a failure
        from it), then resolve ``future``, so whoever sees the result sees the cache updated."""
        if not future.set_running_or_notify_cancel():
            with self._lock:
                self._drop_if(key, future)
            return
        try:
            compiled = self.compiler.compile_grammar(grammar)
        except Exception as e:  # parsed fine but would not compile (resources, internal error)
            with self._lock:
                self._drop_if(key, future)
            future.set_exception(e)
            return
        with self._lock:
            if self.cache.get(key) is future:  # not evicted while it compiled
                size = compiled.memory_size_bytes + len(key[1])
                self.entry_bytes[key] = size
                self.cached_bytes += size
                self._evict()
        future.set_result(compiled)

    def _drop_if(self, key: tuple[str, str], future: Future[xgr.CompiledGrammar]) -> None:
        if self.cache.get(key) is future:
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        del self.cache[key]
        self.cached_bytes -= self.entry_bytes.pop(key, 0)

    def _evict(self) -> None:
        """Least recently used first: any entry while over ``cache_size``, compiled ones while
        over ``cache_bytes`` (one still compiling has no size yet).  Evicting a future only
        uncaches it: the requests that hold it keep it."""
        while len(self.cache) > self.cache_size:
            self._drop(next(iter(self.cache)))
        while self.cached_bytes > self.cache_bytes:
            self._drop(next(key for key in self.cache if key in self.entry_bytes))
