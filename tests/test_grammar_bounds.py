"""Bounds on structured-output constraints (refused before parsing, just-under accepted), the
compiled-grammar cache (one compile per constraint across threads, bounded by bytes, failures not
kept) and the server's compile timeout (``StructuredOutputManager.compile_async``)."""
from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

import infera.structured as structured_module
from infera import SamplingParams
from infera.sampling_params import StructuredOutputParams as SO
from infera.structured import StructuredOutputManager
from infera.structured.bounds import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_GRAMMAR_CHARS, MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH
from infera.structured.grammar_compiler import GrammarCompiler, constraint_key, parse_grammar

TOO_DEEP = f"nested too deeply (the limit is {MAX_SCHEMA_DEPTH} levels of objects and arrays)"


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_compiler(tok: Any, **kwargs: Any) -> GrammarCompiler:
    return GrammarCompiler(tok, len(tok), [tok.eos_token_id], **kwargs)


def make_manager(tok: Any) -> StructuredOutputManager:
    return StructuredOutputManager(SimpleNamespace(hf=tok, eos_token_ids={tok.eos_token_id}), len(tok))


def described(n: int) -> str:
    """A compact schema text of exactly ``n`` characters."""
    head = '{"description":"'
    return head + "x" * (n - len(head) - 2) + '"}'


def nested_text(depth: int) -> str:
    """A schema text whose objects nest ``depth`` deep."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def nested_value(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):  # built in a loop: the test must not recurse either
        value = {"a": value}
    return value


def choices_of(total: int) -> list[str]:
    return ["y" * (total // 64)] * 63 + ["y" * (total - 63 * (total // 64))]


def too_large(what: str, limit: int) -> str:
    return re.escape(f"structured output {what} is too large: the limit is {limit} characters")


# (just under the bound, just over it, the error)
BOUNDS = {
    "schema text size": (SO(json=described(MAX_SCHEMA_CHARS)), SO(json=described(MAX_SCHEMA_CHARS + 1)),
                         too_large("json schema", MAX_SCHEMA_CHARS)),
    "schema object size": (SO(json=json.loads(described(MAX_SCHEMA_CHARS))),
                           SO(json=json.loads(described(MAX_SCHEMA_CHARS + 1))), too_large("json schema", MAX_SCHEMA_CHARS)),
    "schema text depth": (SO(json=nested_text(MAX_SCHEMA_DEPTH)), SO(json=nested_text(MAX_SCHEMA_DEPTH + 1)),
                          re.escape(TOO_DEEP)),
    "schema object depth": (SO(json=nested_value(MAX_SCHEMA_DEPTH)), SO(json=nested_value(MAX_SCHEMA_DEPTH + 1)),
                            re.escape(TOO_DEEP)),
    "regex length": (SO(regex="a" * MAX_GRAMMAR_CHARS), SO(regex="a" * (MAX_GRAMMAR_CHARS + 1)),
                     too_large("regex", MAX_GRAMMAR_CHARS)),
    "grammar length": (SO(grammar='root ::= "' + "a" * (MAX_GRAMMAR_CHARS - 11) + '"'),
                       SO(grammar='root ::= "' + "a" * (MAX_GRAMMAR_CHARS - 10) + '"'),
                       too_large("grammar", MAX_GRAMMAR_CHARS)),
    "choice count": (SO(choice=[f"c{i}" for i in range(MAX_CHOICES)]), SO(choice=[f"c{i}" for i in range(MAX_CHOICES + 1)]),
                     re.escape(f"structured output choice has too many options: the limit is {MAX_CHOICES}")),
    "choice length": (SO(choice=choices_of(MAX_CHOICE_CHARS)), SO(choice=choices_of(MAX_CHOICE_CHARS + 1)),
                      too_large("choice", MAX_CHOICE_CHARS)),
}


@pytest.mark.parametrize("name", BOUNDS)
def test_bound_refuses_just_over_and_accepts_just_under(name: str):
    under, over, error = BOUNDS[name]
    with pytest.raises(ValueError, match=error):
        constraint_key(over)
    assert isinstance(parse_grammar(*constraint_key(under)), xgr.Grammar)


def test_deep_schema_text_is_a_value_error_not_a_recursion_error():
    for schema in ("[" * 100_000, '{"a":' * 20_000):  # json.loads raised RecursionError on both
        with pytest.raises(ValueError, match=re.escape(TOO_DEEP)):
            constraint_key(SO(json=schema))
    with pytest.raises(ValueError, match=re.escape(TOO_DEEP)):
        constraint_key(SO(json=nested_value(100_000)))  # json.dumps recursed on it


def test_brackets_in_strings_do_not_count_as_nesting():
    schema = {"description": "[{" * 1000 + '\\"[', "enum": ["]]" * 1000]}
    assert json.loads(constraint_key(SO(json=json.dumps(schema)))[1]) == schema


def test_schema_sizes_are_bounded_before_a_walk_or_a_dump():
    with pytest.raises(ValueError, match=too_large("json schema", MAX_SCHEMA_CHARS)):
        constraint_key(SO(json={"enum": list(range(10**6))}))  # cut short, not serialized
    circular: dict = {"type": "object"}
    circular["properties"] = {"self": circular}
    with pytest.raises(ValueError, match=re.escape(TOO_DEEP)):  # ended, not walked forever
        constraint_key(SO(json=circular))
    # within the bound as given, over it once non-ASCII characters are escaped in the compact form
    with pytest.raises(ValueError, match=too_large("json schema", MAX_SCHEMA_CHARS)):
        constraint_key(SO(json='{"description":"' + "é" * (MAX_SCHEMA_CHARS // 2) + '"}'))


def test_deep_legit_schema_compiles_and_constrains(hf_tokenizer):
    schema: dict = {"type": "integer", "minimum": 0, "maximum": 9}
    levels = (MAX_SCHEMA_DEPTH - 2) // 2  # each object level nests a schema and its properties
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    schema = {"type": "array", "items": schema, "minItems": 1, "maxItems": 1}
    with pytest.raises(ValueError, match=re.escape(TOO_DEEP)):  # it is right at the bound
        constraint_key(SO(json={"type": "array", "items": schema}))
    compiled = make_compiler(hf_tokenizer).submit(SO(json=schema)).result(timeout=120)
    matcher = xgr.GrammarMatcher(compiled)
    value: Any = 7
    for _ in range(levels):
        value = {"x": value}
    assert matcher.accept_string(json.dumps([value]))  # xgrammar's separators are json.dumps's
    assert matcher.accept_token(hf_tokenizer.eos_token_id) and matcher.is_terminated()


# -- the cache ----------------------------------------------------------------------------
def int_object(n: int) -> SO:
    names = [f"k{i}" for i in range(n)]
    return SO(json={"type": "object", "properties": {k: {"type": "integer"} for k in names}, "required": names})


def test_cache_evicts_least_recently_used_by_bytes(hf_tokenizer):
    params = [int_object(n) for n in range(1, 5)]
    keys = [constraint_key(p) for p in params]
    probe = make_compiler(hf_tokenizer)
    sizes = [probe.submit(p).result(timeout=60).memory_size_bytes + len(k[1]) for p, k in zip(params, keys)]
    assert probe.cached_bytes == sum(sizes)  # each entry: its compiled size and its key text
    assert sizes[3] <= sizes[1] + sizes[2]  # so evicting the second and third makes room for the fourth

    bound = sum(sizes[:3])
    cache = make_compiler(hf_tokenizer, cache_bytes=bound)
    futures = [cache.submit(p) for p in params[:3]]
    for f in futures:
        f.result(timeout=60)
    assert cache.cached_bytes == bound and list(cache.cache) == keys[:3]
    assert cache.submit(params[0]) is futures[0]  # a hit: now the most recently used
    cache.submit(params[3]).result(timeout=60)
    assert keys[1] not in cache.cache  # the least recently used went first
    order = [keys[1], keys[2], keys[0], keys[3]]  # least recently used first
    assert list(cache.cache) == order[len(order) - len(cache.cache):] and len(cache.cache) >= 2
    assert cache.cached_bytes == sum(cache.entry_bytes[k] for k in cache.cache) <= bound
    assert set(cache.entry_bytes) == set(cache.cache)


def test_grammar_over_the_whole_cache_still_compiles(hf_tokenizer):
    cache = make_compiler(hf_tokenizer, cache_bytes=1)
    future = cache.submit(int_object(1))
    assert isinstance(future.result(timeout=60), xgr.CompiledGrammar)  # the request gets it
    assert not cache.cache and cache.cached_bytes == 0  # the cache does not keep it


class CountingCompiler:
    """Stands in for xgrammar's compiler: counts compiles, optionally waits for ``release``
    first or fails the first one, then compiles with the real one."""

    def __init__(self, real: xgr.GrammarCompiler, release: threading.Event | None = None, fail_first: bool = False):
        self.real, self.release, self.fail_next = real, release, fail_first
        self.calls = 0

    def compile_grammar(self, grammar: xgr.Grammar) -> xgr.CompiledGrammar:
        self.calls += 1
        if self.release is not None:
            self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        return self.real.compile_grammar(grammar)


def test_concurrent_submits_compile_once(hf_tokenizer):
    cache = make_compiler(hf_tokenizer)
    counting = cache.compiler = CountingCompiler(cache.compiler)
    start = threading.Barrier(4)

    def submit(_: int):
        start.wait()
        return cache.submit(SO(regex=r"shared [0-9]{3}"))

    with ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(submit, range(4)))
    assert all(f is futures[0] for f in futures)
    assert isinstance(futures[0].result(timeout=60), xgr.CompiledGrammar) and counting.calls == 1


def test_failed_compile_is_not_cached(hf_tokenizer):
    cache = make_compiler(hf_tokenizer)
    counting = cache.compiler = CountingCompiler(cache.compiler, fail_first=True)
    params = SO(regex=r"flaky [a-z]+")
    first = cache.submit(params)
    with pytest.raises(RuntimeError, match="out of memory"):
        first.result(timeout=60)
    assert constraint_key(params) not in cache.cache and cache.cached_bytes == 0
    second = cache.submit(params)  # a retry compiles again
    assert second is not first and isinstance(second.result(timeout=60), xgr.CompiledGrammar)
    assert counting.calls == 2 and cache.cache[constraint_key(params)] is second


def test_compiler_is_built_once_across_threads(hf_tokenizer, monkeypatch):
    built = []

    def counting_compiler(*args: Any, **kwargs: Any) -> GrammarCompiler:
        built.append(1)
        return GrammarCompiler(*args, **kwargs)  # reads the vocabulary: ~0.1 s for the others to race in

    monkeypatch.setattr(structured_module, "GrammarCompiler", counting_compiler)
    manager = make_manager(hf_tokenizer)
    start = threading.Barrier(4)

    def get(_: int) -> GrammarCompiler:
        start.wait()
        return manager.compiler

    with ThreadPoolExecutor(4) as pool:
        compilers = list(pool.map(get, range(4)))
    assert len(built) == 1 and all(c is compilers[0] for c in compilers)


# -- the compile timeout ------------------------------------------------------------------
def test_compile_timeout_refuses_and_leaves_the_compile_for_the_engine(hf_tokenizer):
    manager = make_manager(hf_tokenizer)
    release = threading.Event()
    counting = manager.compiler.compiler = CountingCompiler(manager.compiler.compiler, release)
    # two compiles hold both compile threads until released: the request's own compile is queued
    blockers = [manager.grammar_for(SamplingParams(structured=SO(regex=f"blocker {i}"))) for i in range(2)]
    params = SamplingParams(structured=SO(regex=r"slow [0-9]{2}"))

    async def scenario() -> None:
        with pytest.raises(ValueError, match=re.escape("did not compile within 0.01 s; simplify the schema")):
            await manager.compile_async(params, timeout_s=0.01)
        future = manager.grammar_for(params)  # what add_request calls
        assert not future.done()  # the timeout did not cancel the shared, still queued, compile
        release.set()
        await manager.compile_async(params)  # the same compile, awaited to its end
        assert future.done() and manager.grammar_for(params) is future

    try:
        asyncio.run(scenario())
    finally:
        release.set()  # never leave a compile thread blocked
    assert isinstance(manager.grammar_for(params).result(), xgr.CompiledGrammar)
    assert all(isinstance(b.result(timeout=60), xgr.CompiledGrammar) for b in blockers) and counting.calls == 3


def test_compile_async_refuses_bad_constraints_as_value_errors(hf_tokenizer):
    manager = make_manager(hf_tokenizer)
    asyncio.run(manager.compile_async(SamplingParams()))  # unconstrained: nothing to do
    with pytest.raises(ValueError, match=re.escape(TOO_DEEP)):
        asyncio.run(manager.compile_async(SamplingParams(structured=SO(json="[" * 100_000))))
    with pytest.raises(ValueError, match="structured output regex is invalid"):
        asyncio.run(manager.compile_async(SamplingParams(structured=SO(regex="(unclosed"))))
    manager.compiler.compiler = CountingCompiler(manager.compiler.compiler, fail_first=True)
    with pytest.raises(ValueError, match=re.escape("the grammar did not compile (out of memory)")):
        asyncio.run(manager.compile_async(SamplingParams(structured=SO(regex="fails once"))))
    asyncio.run(manager.compile_async(SamplingParams(structured=SO(regex="fails once"))))  # not cached: compiles
