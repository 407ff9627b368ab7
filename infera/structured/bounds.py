"""Size and nesting bounds on structured-output constraints, checked before anything parses or
compiles them (``constraint_key`` calls these for every request, offline or served).

A request can otherwise make the engine parse and compile arbitrarily large inputs, and a schema
nested thousands deep makes ``json.loads``/``json.dumps`` raise RecursionError.  The limits sit
far above real schemas and grammars: OpenAI's structured outputs accept 10 levels of schema
nesting (about 20 to 40 levels of JSON objects and arrays once ``properties``/``anyOf`` are
counted) and 120,000 characters of property names and enum values; a hand-written regex or EBNF
grammar is a few KiB.  Time is bounded separately, by the compile timeout
(``StructuredOutputManager.compile_async``).
"""
from __future__ import annotations

import re
from typing import Any

MAX_SCHEMA_CHARS = 128 * 1024  # a JSON schema, as given and in its compact form
MAX_SCHEMA_DEPTH = 64  # nesting of a schema's JSON objects and arrays
MAX_GRAMMAR_CHARS = 32 * 1024  # a regex or an EBNF grammar
MAX_CHOICES = 1024
# properties of one object schema: xgrammar's compile time grows steeply with optional properties
# (Sapphire Rapids, one thread: 400 take 0.24 s, 3000 take 235 s)
MAX_OBJECT_PROPERTIES = 512
MAX_CHOICE_CHARS = 64 * 1024  # all choices together

# a JSON string (to its end, closed or not) or a bracket: brackets inside strings do not nest
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def check_schema_text(text: str) -> None:
    """Refuse a schema string over the size or nesting bound, without parsing it."""
    check_schema_size(text)
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        bracket = text[token.start()]
        if bracket in "[{":
            depth += 1
            if depth > MAX_SCHEMA_DEPTH:
                raise _too_deep()
        elif bracket in "]}":
            depth -= 1


def check_schema_value(schema: Any) -> None:
    """Refuse a schema object (dicts and lists) over the nesting or properties bound, walking it without
    recursion.  Every key and value takes at least one character, so the walk stops, as too
    large, once it has counted more of them than the size bound allows: a huge or circular
    object is cut short before it is walked or serialized."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    seen = 1
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
            seen += 2 * len(value)
            properties = value.get("properties")
            if isinstance(properties, dict) and len(properties) > MAX_OBJECT_PROPERTIES:
                raise ValueError(f"structured output json: an object schema has {len(properties)} properties; "
                                 f"the limit is {MAX_OBJECT_PROPERTIES}")
        elif isinstance(value, (list, tuple)):
            children = value
            seen += len(value)
        else:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise _too_deep()
        if seen > MAX_SCHEMA_CHARS:
            raise _too_large("json schema", MAX_SCHEMA_CHARS)
        stack.extend((child, depth + 1) for child in children)


def check_schema_size(text: str) -> None:
    if len(text) > MAX_SCHEMA_CHARS:
        raise _too_large("json schema", MAX_SCHEMA_CHARS)


def check_grammar_text(kind: str, text: str) -> None:
    """Refuse a regex or EBNF grammar over the length bound (``kind`` names it in the error)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _too_large(kind, MAX_GRAMMAR_CHARS)


def check_choices(choices: list[str]) -> None:
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"structured output choice has too many options: the limit is {MAX_CHOICES}")
    if sum(map(len, choices)) > MAX_CHOICE_CHARS:
        raise _too_large("choice", MAX_CHOICE_CHARS)


def _too_large(what: str, limit: int) -> ValueError:
    return ValueError(f"structured output {what} is too large: the limit is {limit} characters")


def _too_deep() -> ValueError:
    return ValueError(f"structured output json: the schema is nested too deeply "
                      f"(the limit is {MAX_SCHEMA_DEPTH} levels of objects and arrays)")
