"""Structured output: JSON schema / regex / EBNF / choice through xgrammar, on the bundled model
(outputs must parse and validate) and on a tiny random model (engine mechanics: the grammar
alone must keep the output valid, whatever the weights)."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch
import xgrammar as xgr

from infera import LLM, SamplingParams
from infera.cli import build_parser, sampling_params
from infera.engine.sequence import Sequence
from infera.kernels import supported_levels
from infera.sampling_params import StructuredOutputParams as SO
from infera.structured import JUMP_FORWARD_MAX_BATCH, GrammarState
from infera.structured import bitmask as bitmask_module
from infera.structured.bitmask import TokenBitmask, pack_bits, unpack_bits
from infera.structured.grammar_compiler import constraint_key

SCHEMAS: list[tuple[str, dict]] = [
    ("a person", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a user with a nested address", {
        "type": "object", "required": ["user"],
        "properties": {"user": {"type": "object", "required": ["id", "address"], "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99},
            "address": {"type": "object", "required": ["city", "zip"], "properties": {
                "city": {"type": "string", "maxLength": 12}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}}),
    ("a list of two to four digits", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "minItems": 2, "maxItems": 4}),
    ("a favourite color", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                           "required": ["color"]}),
    ("today's temperature in Celsius", {"type": "object", "required": ["celsius"],
                                        "properties": {"celsius": {"type": "number", "minimum": -10, "maximum": 40}}}),
    ("a book, the subtitle is optional", {
        "type": "object", "required": ["title"],
        "properties": {"title": {"type": "string", "maxLength": 16}, "subtitle": {"type": "string", "maxLength": 16}}}),
    ("an airport code", {"type": "object", "required": ["code"],
                         "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}),
    ("whether the sky is blue", {"type": "object", "required": ["answer"],
                                 "properties": {"answer": {"type": "boolean"}}}),
    ("two points", {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "required": ["x", "y"],
        "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                       "y": {"type": "integer", "minimum": -9, "maximum": 9}}}}),
    ("a file format version", {"type": "object", "required": ["version", "name"],
                               "properties": {"version": {"const": "1.0"},
                                              "name": {"type": "string", "maxLength": 12}}}),
    ("a value that is a number or a short word", {
        "type": "object", "required": ["value"],
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}}}),
    ("a note that may be null", {"type": "object", "required": ["note"],
                                 "properties": {"note": {"type": ["string", "null"], "maxLength": 10}}}),
    ("a rating from 1 to 3", {"enum": [1, 2, 3]}),
    ("a date", {"type": "object", "required": ["date"],
                "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}}),
    ("a percentage strictly between 0 and 100", {
        "type": "object", "required": ["percent"],
        "properties": {"percent": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}}),
    ("a 2x2 matrix", {"type": "object", "required": ["matrix"], "properties": {"matrix": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}}}}}),
    ("an email address", {"type": "object", "required": ["email"], "properties": {
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}}}),
    ("a deeply nested setting", {"type": "object", "required": ["a"], "properties": {"a": {
        "type": "object", "required": ["b"], "properties": {"b": {
            "type": "object", "required": ["c"], "properties": {"c": {"type": "integer", "minimum": 0,
                                                                      "maximum": 99}}}}}}}),
    ("one to three pets", {"type": "object", "required": ["pets"], "properties": {"pets": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}}}),
    ("a word of three to eight letters", {"type": "object", "required": ["word"], "properties": {
        "word": {"type": "string", "minLength": 3, "maxLength": 8}}}),
    ("a line from a start point to an end point", {
        "$defs": {"point": {"type": "object", "required": ["x", "y"],
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "type": "object", "required": ["start", "end"],
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}}),
    ("a probability", {"type": "number", "minimum": 0, "maximum": 1}),
    ("a three-digit room number and a floor", {
        "type": "object", "required": ["room", "floor"],
        "properties": {"room": {"type": "integer", "minimum": 100, "maximum": 999},
                       "floor": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "ground"}]}}}),
]

MAX_TOKENS = 96


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def tiny(tiny_model) -> LLM:
    """A tiny random-weight model with a KV cache of 6 blocks (96 tokens), small enough to preempt."""
    return LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory=6 * 2 * 2 * 16 * 2 * 16 * 4,
               max_num_batched_tokens=64)


def prompt_for(llm: LLM, what: str, schema: dict) -> list[int]:
    return llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Give {what} as JSON following this schema: {json.dumps(schema)}"}])


def check_json(out, schema: dict) -> None:
    c = out.outputs[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.text)
    jsonschema.validate(json.loads(c.text), schema)


# -- JSON schemas on the bundled model --------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_schemas_in_mixed_batch_of_32(llm: LLM, temperature: float):
    """Every schema's output parses and validates, in a batch of 32 sequences with unconstrained
    requests, plus any-JSON-object (greedy) or n=3 samples of one schema (sampled)."""
    prompts, params = [], []
    for i, (what, schema) in enumerate(SCHEMAS):
        prompts.append(prompt_for(llm, what, schema))
        params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=MAX_TOKENS,
                                     structured=SO(json=schema)))
    what, person = SCHEMAS[0]
    prompts.append(prompt_for(llm, what, person))
    if temperature == 0:
        params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured=SO(json_object=True)))
    else:
        params.append(SamplingParams(n=3, temperature=temperature, seed=99, max_tokens=MAX_TOKENS,
                                     structured=SO(json=person)))
    free = 32 - sum(p.n for p in params)
    for i in range(free):
        prompts.append(llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Count to {i + 3}."}]))
        params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=8))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (_, schema) in zip(outs, SCHEMAS):
        check_json(out, schema)
    extra = outs[len(SCHEMAS)].outputs
    if temperature == 0:
        assert extra[0].finish_reason == "stop" and isinstance(json.loads(extra[0].text), dict), extra[0]
    else:
        assert len(extra) == 3
        for c in extra:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), person)
    for out in outs[len(SCHEMAS) + 1:]:
        assert len(out.outputs[0].token_ids) <= 8


@pytest.mark.parametrize("temperature, jump_forward", [(0.0, True), (1.0, False)])
def test_schema_alone(llm: LLM, temperature: float, jump_forward: bool):
    what, schema = SCHEMAS[1]
    llm.engine.structured.jump_forward_max_batch = 1 if jump_forward else 0
    try:
        out = llm.generate(prompt_for(llm, what, schema), SamplingParams(temperature=temperature, seed=3,
                           max_tokens=MAX_TOKENS, structured=SO(json=schema)), use_tqdm=False)[0]
    finally:
        llm.engine.structured.jump_forward_max_batch = JUMP_FORWARD_MAX_BATCH
    check_json(out, schema)


# -- regex, EBNF, choice on the bundled model -------------------------------------------------
REGEXES = [r"\d{3}-\d{3}-\d{4}", r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
           r"#[0-9a-f]{6}", r"[A-Z][a-z]{2,9}( [A-Z][a-z]{2,9})?", r"(yes|no), because [a-z ]{1,30}\."]

ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]{1,3} | "(" expr ")"
"""


def parse_arithmetic(text: str) -> bool:
    """A recursive-descent parser for ARITHMETIC: True if all of ``text`` is one expression."""
    pos = 0

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        digits = re.match(r"[0-9]{1,3}", text[pos:])
        if not digits:
            return False
        pos += digits.end()
        return True

    def chain(item, ops: str) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def test_regex_grammar_and_choice(llm: LLM):
    asks = ["Give a US phone number.", "Give a date.", "Give a color in hex.", "Name a city.",
            "Is water wet? Answer and explain.", "Write an arithmetic expression such as (3+4)*5.",
            "Is the sun hot?"]
    constraints = [SO(regex=r) for r in REGEXES] + [SO(grammar=ARITHMETIC), SO(choice=["yes", "no", "maybe"])]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": a}]) for a in asks]
    params = [SamplingParams(temperature=0, max_tokens=48, structured=c) for c in constraints]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for regex, out in zip(REGEXES, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), (regex, c.text, c.finish_reason)
    assert outs[5].outputs[0].finish_reason == "stop" and parse_arithmetic(outs[5].outputs[0].text), outs[5].outputs[0]
    assert outs[6].outputs[0].text in ("yes", "no", "maybe")
    assert not parse_arithmetic("(1+2") and not parse_arithmetic("1+") and parse_arithmetic("(1+2)*30/4")


def test_unsatisfiable_within_max_tokens_ends_with_length(llm: LLM):
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    schema = {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 40, "items": {"type": "integer", "minimum": 1000, "maximum": 9999}}}}
    outs = llm.generate([prompt] * 2, [SamplingParams(temperature=0, max_tokens=12, structured=SO(regex="a{500}")),
                                       SamplingParams(temperature=0, max_tokens=12, structured=SO(json=schema))],
                        use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "length" and re.fullmatch("a+", outs[0].outputs[0].text)
    assert outs[1].outputs[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(outs[1].outputs[0].text)


def test_stop_string_and_min_tokens(llm: LLM):
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Is the sun hot?"}])
    outs = llm.generate([prompt] * 2, [
        SamplingParams(temperature=0, max_tokens=30, stop=[","], structured=SO(regex=r"(yes|no), [a-z ]{5,20}\.")),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=10, structured=SO(choice=["yes", "no"]))],
        use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].stop_reason == ","
    assert outs[0].outputs[0].text in ("yes", "no")
    assert outs[1].outputs[0].finish_reason == "stop" and outs[1].outputs[0].text in ("yes", "no")


# -- bad constraints --------------------------------------------------------------------------
@pytest.mark.parametrize("constraint, words", [
    (SO(json={"type": "object", "properties": {"a": {"type": "frobnicate"}}}), ["json schema", "frobnicate"]),
    (SO(json="{not json"), ["json", "not valid JSON"]),
    (SO(json={"type": "integer", "minimum": 5, "maximum": 1}), ["json schema", "minimum"]),
    (SO(regex="(ab"), ["regex", "parenthesis"]),
    (SO(grammar="root ::= item"), ["grammar", "item"]),
    (SO(grammar='root ::= "unterminated'), ["grammar", "string"]),
])
def test_invalid_constraint_is_a_value_error_before_any_work(tiny: LLM, constraint: SO, words: list[str]):
    engine = tiny.engine
    with pytest.raises(ValueError) as err:
        engine.add_request("hello", SamplingParams(structured=constraint))
    message = str(err.value)
    assert all(w.lower() in message.lower() for w in words), message
    assert "/project/" not in message and not engine.has_unfinished_requests()


def test_structured_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        SO(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="choice"):
        SO(choice=[])


# -- the mask against a slow reference ----------------------------------------------------------
def reference_allowed(matcher: xgr.GrammarMatcher, vocab_size: int) -> torch.Tensor:
    """Try every token: accepted tokens are allowed (then rolled back)."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for t in range(vocab_size):
        if matcher.accept_token(t):
            allowed[t] = True
            matcher.rollback(1)
    return allowed


def test_bitmask_matches_token_by_token_reference(tiny: LLM, monkeypatch: pytest.MonkeyPatch):
    engine = tiny.engine
    structured, tok, vocab = engine.structured, engine.tokenizer, engine.runner.vocab_size
    schema = {"type": "object", "required": ["n", "ok"], "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 50}, "ok": {"type": "boolean"}}}
    future = structured.grammar_for(SamplingParams(structured=SO(json=schema)))
    unconstrained = Sequence([1, 2], SamplingParams())
    seq = Sequence([1, 2], SamplingParams())
    seq.grammar_state = GrammarState(future)
    prefixes = ['', '{"n": ', '{"n": 4', '{"n": 42, "ok": ', '{"n": 42, "ok": true}']
    eos = sorted(tok.eos_token_ids)
    for prefix in prefixes:
        state = GrammarState(future)
        for t in tok.encode(prefix, add_special_tokens=False):
            assert state.accept(t)
        seq.grammar_state = state
        batch = structured.bitmask.fill([unconstrained, seq])
        assert batch is not None and batch.rows == [1]
        got = unpack_bits(batch.bitmask[1], vocab)
        want = reference_allowed(state.matcher, vocab)
        assert torch.equal(got, want), (prefix, (got != want).nonzero()[:10].flatten().tolist())
        # the end of the sequence is allowed exactly where the grammar is complete
        assert bool(got[eos].any()) == (prefix == prefixes[-1])
        logits = torch.randn(2, vocab)
        for level in (*supported_levels(), None):  # the native kernel at each ISA level, the numpy path without it
            with monkeypatch.context() as m:
                if level is None:
                    m.setattr(bitmask_module, "cpu_kernels", lambda x: None)
                else:
                    m.setenv("INFERA_CPU_ISA", level)
                masked = logits.clone()
                batch.apply(masked)
            assert torch.equal(masked[0], logits[0])  # the unconstrained row is untouched
            assert torch.equal(masked[1], logits[1].masked_fill(~want, float("-inf")))


def test_bitmask_skips_unconstrained_batches_and_packs_bits():
    bitmask = TokenBitmask(100, [2])
    assert bitmask.fill([Sequence([1], SamplingParams()), Sequence([1], SamplingParams())]) is None
    allowed = torch.rand(100) > 0.5
    assert torch.equal(unpack_bits(pack_bits(allowed), 100), allowed)
    assert torch.equal(unpack_bits(bitmask.stop_only, 100), torch.arange(100) == 2)


def test_compile_cache_is_keyed_by_content(tiny: LLM):
    structured = tiny.engine.structured
    a = structured.grammar_for(SamplingParams(structured=SO(json={"type": "object", "properties": {"x": {}}})))
    b = structured.grammar_for(SamplingParams(structured=SO(json='{"type": "object", "properties": {"x": {}}}')))
    assert a is b  # a schema given as text is the same constraint as the same schema given as a dict
    # key order is the output order, so it is part of the key
    assert constraint_key(SO(json={"a": 1, "b": 2})) != constraint_key(SO(json={"b": 2, "a": 1}))


# -- engine mechanics on the tiny model -------------------------------------------------------
def run(engine, request_ids: list[str]) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return {rid: outs[rid] for rid in request_ids}


def test_preemption_keeps_matchers_in_step(tiny: LLM):
    engine = tiny.engine
    regex = r"[a-z]{2,5}-[0-9]{24,30}"  # digits are one token each: 4 x 28+ tokens > 96
    before = engine.scheduler.num_preemptions
    ids = [engine.add_request([1, 5 + i, 9], SamplingParams(temperature=1.0, seed=i, max_tokens=48,
                              structured=SO(regex=regex))) for i in range(4)]
    outs = run(engine, ids)
    assert engine.scheduler.num_preemptions > before
    for out in outs.values():
        c = out.outputs[0]
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), (c.text, c.finish_reason)


def test_fork_gives_each_branch_its_own_matcher(tiny: LLM):
    engine = tiny.engine
    schema = {"type": "object", "required": ["w", "n"], "properties": {
        "w": {"type": "string", "pattern": "^[a-z]{3,6}$"}, "n": {"type": "integer", "minimum": 0, "maximum": 999}}}
    rid = engine.add_request([1, 2, 3], SamplingParams(temperature=1.0, seed=1, max_tokens=40,
                                                       structured=SO(json=schema)))
    req = engine.requests[rid]
    parent = req.seqs[0]
    while parent.num_output_tokens < 4:
        engine.step()
    child = engine.fork(parent, 1)
    req.seqs.append(child)
    assert child.grammar_state.matcher is not parent.grammar_state.matcher
    while parent.finish_reason is None or child.finish_reason is None:
        engine.step()
    engine.abort_request(rid)  # the request expects n=1 sequence: drop it by hand
    assert not engine.has_unfinished_requests()
    for seq in (parent, child):
        assert seq.finish_reason == "stop"
        jsonschema.validate(json.loads(tiny.tokenizer.decode(seq.output_token_ids)), schema)
    assert parent.grammar_state.matcher is None and child.grammar_state.matcher is None  # released


def test_uncompiled_grammar_waits_while_others_run(tiny: LLM):
    engine, structured = tiny.engine, tiny.engine.structured
    constraint = SO(regex=r"waiting [0-9]{2}")
    pending: Future = Future()
    structured.compiler.cache[constraint_key(constraint)] = pending
    held = engine.add_request([1, 2], SamplingParams(temperature=0, max_tokens=8, structured=constraint))
    free = engine.add_request([1, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    done = {}
    while free not in done:
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert held not in done and engine.requests[held].seqs[0].num_computed_tokens == 0
    pending.set_result(structured.compiler.compiler.compile_regex(r"waiting [0-9]{2}"))
    out = run(engine, [held])[held].outputs[0]
    assert out.finish_reason == "stop" and re.fullmatch(r"waiting [0-9]{2}", out.text)
    del structured.compiler.cache[constraint_key(constraint)]


def test_abort_while_waiting_for_grammar(tiny: LLM):
    engine, structured = tiny.engine, tiny.engine.structured
    constraint = SO(regex=r"never [0-9]")
    structured.compiler.cache[constraint_key(constraint)] = Future()
    rid = engine.add_request([1, 2], SamplingParams(n=2, structured=constraint))
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and not structured.waiting
    del structured.compiler.cache[constraint_key(constraint)]


def test_failed_compilation_aborts_the_request(tiny: LLM):
    engine, structured = tiny.engine, tiny.engine.structured
    constraint = SO(regex=r"broken [0-9]")
    failed: Future = Future()
    failed.set_exception(RuntimeError("out of memory"))
    structured.compiler.cache[constraint_key(constraint)] = failed
    rid = engine.add_request([1, 2], SamplingParams(structured=constraint))
    out = run(engine, [rid])[rid].outputs[0]
    assert out.finish_reason == "abort" and out.text == ""
    del structured.compiler.cache[constraint_key(constraint)]


def test_jump_forward_appends_forced_text(tiny: LLM):
    engine = tiny.engine
    forced = "the answer is: "
    before = engine.structured.num_forced_tokens
    rid = engine.add_request([1, 2], SamplingParams(temperature=1.0, seed=0, max_tokens=30,
                                                    structured=SO(regex="t" + forced[1:] + "(yes|no)")))
    out = run(engine, [rid])[rid].outputs[0]
    assert out.text in (forced + "yes", forced + "no") and out.finish_reason == "stop"
    assert engine.structured.num_forced_tokens > before


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_flags(tmp_path):
    parse = build_parser().parse_args
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    file = tmp_path / "schema.json"
    file.write_text(json.dumps(schema))
    grammar = tmp_path / "g.ebnf"
    grammar.write_text('root ::= "a"+')
    assert sampling_params(parse(["generate", "x", "--json-schema", str(file)])).structured.json == schema
    assert sampling_params(parse(["generate", "x", "--json-schema", json.dumps(schema)])).structured.json == schema
    assert sampling_params(parse(["generate", "x", "--grammar", str(grammar)])).structured.grammar == 'root ::= "a"+'
    assert sampling_params(parse(["generate", "x", "--regex", "a+"])).structured.regex == "a+"
    assert sampling_params(parse(["generate", "x", "--choice", "a", "--choice", "b"])).structured.choice == ["a", "b"]
    assert sampling_params(parse(["generate", "x", "--json-object"])).structured.json_object
    assert sampling_params(parse(["generate", "x"])).structured is None
    with pytest.raises(SystemExit):
        parse(["generate", "x", "--regex", "a", "--json-object"])
    with pytest.raises(ValueError, match="not valid JSON"):
        sampling_params(parse(["generate", "x", "--json-schema", "{oops"]))
