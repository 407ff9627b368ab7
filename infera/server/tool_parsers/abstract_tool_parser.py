"""What every tool call parser does: find the calls in a model's output, complete or still being
written, and describe its call format as an xgrammar structural tag (for forced tool choices).

A parser reads the whole output so far each time (:meth:`ToolParser.parse`) and answers
monotonically: the content and each call's arguments it returns for some text are prefixes of
what it returns for any longer text, and calls are only ever added.  It holds back what might
still turn out to be something else (a marker half written, trailing whitespace before a call,
a call whose name is not complete), so that a stream can send the difference from one answer to
the next and end with exactly what the whole output parses to.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from infera.server.tool_parsers.utils import ObjectScan, partial_suffix, scan_object, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")
MAX_WHITESPACE = 16  # consecutive whitespace characters in forced arguments


@dataclass
class ToolCallText:
    """A tool call as far as it is written: its function's name and its arguments' JSON text."""

    name: str
    arguments: str


@dataclass
class ToolCallsParse:
    content: str
    tool_calls: list[ToolCallText] = field(default_factory=list)


class ToolParser:
    """A model family's tool call format.  Subclasses set the class variables and :meth:`parse`."""

    name: ClassVar[str]
    template_markers: ClassVar[tuple[str, ...]]  # text in a chat template that shows the format
    call_begin: ClassVar[str]  # one call's text up to its arguments; {name} is the function's name in JSON
    call_end: ClassVar[str]  # its text after the arguments
    separator: ClassVar[str]  # between calls
    keeps_special_tokens: ClassVar[bool] = False  # its markers are special tokens: keep them in the text

    def parse(self, text: str, final: bool) -> ToolCallsParse:
        """The content and tool calls in ``text``; ``final``: the output is complete (nothing held back)."""
        raise NotImplementedError

    def call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def calls_format(self, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> dict[str, Any]:
        """A structural-tag format of one or more calls (just one unless ``parallel``) of ``functions``
        (name, arguments schema) and nothing else."""
        # a separator may also end the output: a model that writes one before its end-of-turn token is
        # not then forced into another call
        end = {"type": "optional", "content": {"type": "const_string", "value": self.separator}}
        return {"type": "sequence", "elements": [self.call_tags(functions, parallel), end]}

    def call_tags(self, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> dict[str, Any]:
        """The calls alone, separated by :attr:`separator`."""
        # whitespace runs bounded (a model can loop on them) but room to indent
        tags = [{"type": "tag", "begin": self.call_begin.format(name=json.dumps(name)),
                 "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE},
                 "end": self.call_end} for name, schema in functions]
        return {"type": "tags_with_separator", "tags": tags, "separator": self.separator, "at_least_one": True,
                "stop_after_first": not parallel}

    @staticmethod
    def split_content(text: str, marker: str, final: bool) -> tuple[str, int | None]:
        """The content before the first ``marker`` and where the marker is (None: not yet).  Without
        a marker a final text is all content; else trailing whitespace and a marker's beginning wait."""
        i = text.find(marker)
        if i >= 0:
            return text[:i].rstrip(), i
        if final:
            return text, None
        return text[:len(text) - partial_suffix(text, marker)].rstrip(), None

    @staticmethod
    def calls_from(text: str, i: int, separators: str) -> tuple[list[ToolCallText], int | None]:
        """The calls written as JSON objects from ``text[i]`` on, separated by one of ``separators``,
        and where they end (None while the last one is open)."""
        calls = []
        while True:
            i = skip_ws(text, i)
            if i >= len(text):
                return calls, None
            if text[i] != "{":
                return calls, i
            scan = scan_object(text, i)
            call = call_from_object(text, scan)
            if call is not None:
                calls.append(call)
            if scan.end is None:
                return calls, None if not scan.broken else i
            i = skip_ws(text, scan.end)
            if i >= len(text):
                return calls, None
            if text[i] not in separators:
                return calls, i
            i += 1

    @staticmethod
    def finish(text: str, content: str, calls: list[ToolCallText], final: bool) -> ToolCallsParse:
        """A final output without a call is all content (a broken call included)."""
        return ToolCallsParse(text if final and not calls else content, calls)


def call_from_object(text: str, scan: ObjectScan) -> ToolCallText | None:
    """The call an object describes (``name`` and ``arguments`` or ``parameters``), once its name is
    complete.  An arguments object streams as it is written; arguments given as a JSON string (or
    any other value) appear whole once complete; without arguments they are ``{}`` once the object closes."""
    span = scan.values.get("name")
    if span is None or span[1] is None:
        return None
    try:
        name = json.loads(text[span[0]:span[1]])
    except ValueError:
        return None
    if not isinstance(name, str):
        return None
    span = next((scan.values[k] for k in ARGUMENT_KEYS if k in scan.values), None)
    if span is None:
        return ToolCallText(name, "{}" if scan.end is not None else "")
    start, end = span
    if text[start] == "{":
        return ToolCallText(name, text[start:len(text) if end is None else end])
    if end is None:
        return ToolCallText(name, "")
    try:
        value = json.loads(text[start:end])
    except ValueError:
        return ToolCallText(name, text[start:end])
    return ToolCallText(name, value if isinstance(value, str) else json.dumps(value))
