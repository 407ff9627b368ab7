"""Structured-output constraints -> xgrammar compiled grammars, validated up front and
compiled off the engine loop.

``validate`` parses the constraint (JSON schema, regex, EBNF, choice) into an
``xgrammar.Grammar`` synchronously: parsing takes well under a millisecond, and it is where
every user error shows up, so a bad request fails in ``add_request`` before any token is
generated.  ``submit`` then compiles the grammar against the vocabulary (token-mask
precomputation, the expensive part) in a worker thread and returns a future; xgrammar
releases the GIL while it compiles, so running sequences keep decoding meanwhile.
Compiled grammars are cached by content (an LRU of ``cache_size`` entries).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xgrammar as xgr

from infera.sampling_params import StructuredOutputParams

_XGR_PREFIX = re.compile(r"^\s*(\[[\d:]+\]\s*)?(\S+\.(cc|h):\d+:\s*)?(Check failed: .*? is false: )?")


def constraint_key(params: StructuredOutputParams) -> tuple[str, str]:
    """The cache key of a constraint: its kind and its canonical text."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured output json: the schema is not valid JSON ({e})") from None
            except RecursionError:
                raise ValueError("structured output json: the schema is nested too deeply") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured output json: the schema must be a JSON object, got {type(schema).__name__}")
        return "json", json.dumps(schema, separators=(",", ":"))  # key order matters: it is the output order
    if params.json_object:
        return "json", '{"type":"object"}'
    if params.regex is not None:
        return "regex", params.regex
    if params.grammar is not None:
        return "grammar", params.grammar
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
        choices = json.loads(text)
        # EBNF string literals take JSON's escapes, so json.dumps quotes each choice exactly
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    except (RuntimeError, ValueError, TypeError) as e:
        name = {"json": "json schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}[kind]
        raise ValueError(f"structured output {name} is invalid: {_clean(str(e))}") from None


def _clean(message: str) -> str:
    """xgrammar's C++ errors, without the timestamp, source location and check text."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return _XGR_PREFIX.sub("", first, count=1).strip() or first


class GrammarCompiler:
    """One per engine: the tokenizer's xgrammar view, a compile thread and the cache."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256,
                 max_threads: int = 2):
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                                 stop_token_ids=self.stop_token_ids)
        # our cache holds the results; xgrammar's own cache would keep a second copy
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="infera-grammar")
        self.cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self.cache_size = cache_size

    def submit(self, params: StructuredOutputParams) -> Future[xgr.CompiledGrammar]:
        """Validate ``params`` now (ValueError if bad) and return its compiled grammar's future."""
        key = constraint_key(params)
        future = self.cache.get(key)
        if future is not None:
            self.cache.move_to_end(key)
            return future
        grammar = parse_grammar(*key)
        future = self.executor.submit(self.compiler.compile_grammar, grammar)
        self.cache[key] = future
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return future
