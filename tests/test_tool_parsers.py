"""Tool call and reasoning parsers on fixed outputs: the whole text parses to the expected message,
and streamed in pieces (split at every character boundary, and one character at a time) the deltas
add up to exactly that message, each tool call's id and name coming before its arguments."""
from __future__ import annotations

import json

import pytest

from infera.sampling_params import StructuredOutputParams
from infera.server.chat_output import ChatOutputParser
from infera.server.reasoning_parser import ReasoningParser
from infera.server.tool_parsers import TOOL_PARSERS, detect_tool_parser

WEATHER = {"city": "Paris", "days": [1, {"note": "a } and a \" and <tool_call>"}]}
ARGS = json.dumps(WEATHER)

# (parser, model output, expected content, expected calls as (name, arguments text))
CASES = [
    ("hermes", f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "get_time", "arguments": {{}}}}\n</tool_call>',
     "Let me check.", [("get_weather", ARGS), ("get_time", "{}")]),
    ("hermes", '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>', None, [("f", '{"x": 1}')]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', None, [("f", '{"x": 1}')]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    ("hermes", "<tool_call>\nnot json</tool_call>", "<tool_call>\nnot json</tool_call>", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2', None, [("f", '{"x": [1, 2')]),  # cut off
    # Qwen2.5-Coder's fenced calls; fences of anything else are content
    ("hermes", f'```json\n{{\n  "name": "get_weather",\n  "arguments": {ARGS}\n}}\n```', None,
     [("get_weather", ARGS)]),
    ("hermes", ' ```\n{"name": "f", "arguments": {}}\n```\nDone.', None, [("f", "{}")]),
    ("hermes", '```json\n{"city": "Paris"}\n```', '```json\n{"city": "Paris"}\n```', []),
    ("hermes", '```python\nprint("x")\n```', '```python\nprint("x")\n```', []),
    ("hermes", 'Here:\n```json\n{"name": "f", "arguments": {}}\n```', 'Here:\n```json\n{"name": "f", "arguments": {}}\n```', []),
    ("hermes", '``', '``', []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {ARGS}}}; {{"name": "get_time", "parameters": {{}}}}',
     None, [("get_weather", ARGS), ("get_time", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"a": true}}', None, [("f", '{"a": true}')]),
    ("llama3_json", 'The answer is {"name": "x"}.', 'The answer is {"name": "x"}.', []),
    ("llama3_json", '{"answer": 42} is JSON, not a call', '{"answer": 42} is JSON, not a call', []),
    ("mistral", f'Sure [TOOL_CALLS] [{{"name": "get_weather", "arguments": {ARGS}}}, '
                '{"name": "g", "arguments": {}}]',
     "Sure", [("get_weather", ARGS), ("g", "{}")]),
    ("mistral", "Plain [TOOL answer", "Plain [TOOL answer", []),
]


def stream(parser: ChatOutputParser, pieces: list[str]) -> dict:
    """The deltas of ``pieces`` added up as a message; checks each call's id and name come first."""
    got = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": []}
    for k, piece in enumerate(pieces):
        for delta in parser.deltas(piece, final=k == len(pieces) - 1):
            body = delta.model_dump()
            for key in ("content", "reasoning_content", "reasoning"):
                got[key] += body.get(key, "")
            for call in body.get("tool_calls", []):
                calls = got["tool_calls"]
                if call["index"] == len(calls):  # a new call: id, type and name, arguments empty
                    assert call["id"] and call["type"] == "function" and call["function"] == {
                        "name": call["function"]["name"], "arguments": ""}
                    calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
                else:
                    assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                    calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return got


def whole(parser: ChatOutputParser, text: str) -> dict:
    m = parser.message(text)
    return {"content": m.content or "", "reasoning_content": m.reasoning_content or "",
            "reasoning": m.reasoning or "",
            "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                           for c in m.tool_calls]}


def splits(text: str) -> list[list[str]]:
    """The text in two pieces at every boundary, and one character at a time."""
    return [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]


def same_ignoring_ids(a: dict, b: dict) -> bool:
    strip = lambda m: {**m, "tool_calls": [{**c, "id": None} for c in m["tool_calls"]]}  # noqa: E731
    return strip(a) == strip(b)


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_tool_parser_whole_and_streamed(name, text, content, calls):
    message = ChatOutputParser(None, TOOL_PARSERS[name]()).message(text)
    assert message.content == content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == calls
    for c in message.tool_calls:
        if c.function.arguments.endswith("}"):
            json.loads(c.function.arguments)
    expected = whole(ChatOutputParser(None, TOOL_PARSERS[name]()), text)
    for pieces in splits(text):
        assert same_ignoring_ids(stream(ChatOutputParser(None, TOOL_PARSERS[name]()), pieces), expected), pieces


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_tool_parser_is_monotonic(name, text, content, calls):
    """What a prefix parses to never shrinks nor changes as the text grows."""
    parser = TOOL_PARSERS[name]()
    before = parser.parse("", False)
    for k in range(1, len(text) + 1):
        now = parser.parse(text[:k], k == len(text))
        assert now.content.startswith(before.content)
        assert len(now.tool_calls) >= len(before.tool_calls)
        for old, new in zip(before.tool_calls, now.tool_calls):
            assert new.name == old.name and new.arguments.startswith(old.arguments)
        before = now


def test_parallel_tool_calls_false_keeps_the_first():
    text = CASES[0][1]
    message = ChatOutputParser(None, TOOL_PARSERS["hermes"](), parallel_tool_calls=False).message(text)
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_call_ids():
    assert TOOL_PARSERS["hermes"]().call_id().startswith("call_")
    mistral_id = TOOL_PARSERS["mistral"]().call_id()
    assert len(mistral_id) == 9 and mistral_id.isalnum()


def test_detect_tool_parser_from_template():
    assert detect_tool_parser("... <tool_call>\\n{\"name\": ... </tool_call>") == "hermes"
    assert detect_tool_parser("{{- '[TOOL_CALLS]' }}") == "mistral"
    assert detect_tool_parser("{{- '<|python_tag|>' }}") == "llama3_json"
    assert detect_tool_parser("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_tool_parser(None) is None


# (the prompt ends inside <think>, output, expected reasoning, expected content: None beside reasoning only)
REASONING = [
    (False, "<think>\nFirst, 2 + 2 = 4.\n</think>\n\nThe answer is 4.", "First, 2 + 2 = 4.", "The answer is 4."),
    (True, "Hmm, 2 + 2 is 4.\n</think>\n\n4", "Hmm, 2 + 2 is 4.", "4"),
    (False, "No thinking here, <think> is just text.", "", "No thinking here, <think> is just text."),
    (False, "<think>cut off while thinking", "cut off while thinking", None),
    (True, "", "", ""),
]


@pytest.mark.parametrize("opened,text,reasoning,content", REASONING)
def test_reasoning_parser_whole_and_streamed(opened, text, reasoning, content):
    message = ChatOutputParser(ReasoningParser(opened), None).message(text)
    assert (message.reasoning_content or "", message.reasoning or "", message.content) == (reasoning, reasoning,
                                                                                          content)
    expected = whole(ChatOutputParser(ReasoningParser(opened), None), text)
    for pieces in splits(text):
        assert stream(ChatOutputParser(ReasoningParser(opened), None), pieces) == expected, pieces


def test_reasoning_then_tool_calls():
    text = ('<think>\nThe user wants the weather; call get_weather.\n</think>\n\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    make = lambda: ChatOutputParser(ReasoningParser(False), TOOL_PARSERS["hermes"]())  # noqa: E731
    message = make().message(text)
    assert message.reasoning_content == "The user wants the weather; call get_weather."
    assert message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    expected = whole(make(), text)
    for pieces in splits(text):
        assert same_ignoring_ids(stream(make(), pieces), expected), pieces


# -- the constraints forced choices and reasoning build, on fixed strings ------------------------
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
          "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def accepts(tokenizer_dir):
    """``accepts(params, text)``: whether the constraint's grammar takes all of ``text`` and may end there."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from infera.structured.grammar_compiler import constraint_key, parse_grammar

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(tokenizer_dir)))

    def accepts(params: StructuredOutputParams, text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(parse_grammar(*constraint_key(params))))
        return matcher.accept_string(text) and matcher.is_completed()

    return accepts


def calls_constraint(name: str, parallel: bool) -> StructuredOutputParams:
    fmt = TOOL_PARSERS[name]().calls_format([("get_weather", SCHEMA), ("noop", {"type": "object"})], parallel)
    return StructuredOutputParams(structural_tag=json.dumps({"type": "structural_tag", "format": fmt}))


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_forced_calls_grammar_is_the_parsers_format(accepts, name):
    """What the forced-choice grammar takes, the parser reads back as the same calls; other text is refused."""
    parser = TOOL_PARSERS[name]()
    one = parser.call_begin.format(name='"get_weather"') + '{"city": "Paris"}' + parser.call_end
    two = one + parser.separator + parser.call_begin.format(name='"noop"') + "{}" + parser.call_end
    if name == "mistral":
        one, two = f"[TOOL_CALLS][{one}]", f"[TOOL_CALLS][{two}]"
    for text, parallel in ((one, False), (one, True), (two, True)):
        assert accepts(calls_constraint(name, parallel), text), text
        parsed = parser.parse(text, final=True)
        assert parsed.content == "" and [c.name for c in parsed.tool_calls] == (
            ["get_weather", "noop"] if text == two else ["get_weather"])
        assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}
    assert not accepts(calls_constraint(name, False), two)  # one call only
    if name != "mistral":  # a separator may end the calls (then the end-of-turn token)
        assert accepts(calls_constraint(name, True), one + parser.separator)
    assert not accepts(calls_constraint(name, True), one.replace("Paris", "Rome"))  # arguments off the schema
    assert not accepts(calls_constraint(name, True), "I will not call a tool.")
    assert not accepts(calls_constraint(name, True), "")  # at least one call


@pytest.mark.parametrize("opened", [False, True])
def test_constraint_after_reasoning(accepts, opened):
    constraint = ReasoningParser(opened).constrain(StructuredOutputParams(json=SCHEMA))
    think = "" if opened else "<think>"
    assert accepts(constraint, think + "Paris, surely { not JSON here }.</think>\n\n{\"city\":\"Paris\"}")
    assert not accepts(constraint, think + "thinking</think>\n\nParis")
    assert not accepts(constraint, think + "thinking</think>\n\n{\"city\":\"Rome\"}")
    assert accepts(constraint, '{"city":"Lima"}') != opened  # the thinking is optional unless the prompt opened it
    tools = ReasoningParser(opened).constrain(calls_constraint("hermes", False))
    assert accepts(tools, think + 'why</think>\n\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    assert not accepts(tools, think + "why</think>\n\nno call")
