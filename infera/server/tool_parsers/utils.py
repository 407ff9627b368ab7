"""Scanning JSON that a model is still writing: where an object's keys and values start and end,
so that a tool call's name is known as soon as it is complete and its arguments can be streamed as
they grow."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = " \t\r\n"
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# a string (closed or not: then it runs to the end of the text) or a bracket; brackets in strings do not count
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(r'[^,}\]\s]*')


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """Where the JSON value that starts at ``text[i]`` ends (the index after it); None while the
    text may still be inside it.  Lenient: bracket kinds are not matched, scalars are not checked."""
    if text[i] == '"':
        m = _STRING.match(text, i)
        return m.end() if m else None
    if text[i] in "[{":
        depth = 0
        for m in _TOKEN.finditer(text, i):
            bracket = m.group()
            if bracket in ("[", "{"):
                depth += 1
            elif bracket in ("]", "}"):
                depth -= 1
                if depth == 0:
                    return m.end()
        return None
    end = _SCALAR.match(text, i).end()
    return end if end < len(text) else None


@dataclass
class ObjectScan:
    """A scan of a JSON object that may be incomplete.  ``values``: each key's value span (its end
    None while it is open); ``end``: the index after the closing brace, None until then; ``broken``:
    the text stopped being a JSON object there (the scan went no further)."""

    values: dict[str, tuple[int, int | None]]
    end: int | None = None
    broken: bool = False


def scan_object(text: str, i: int) -> ObjectScan:
    """Scan the object whose ``{`` is ``text[i]``."""
    scan = ObjectScan({})
    i += 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] == "," and scan.values:
            i = skip_ws(text, i + 1)
            if i >= len(text):
                return scan
        m = _STRING.match(text, i)
        if m is None:
            scan.broken = text[i] != '"'  # else a key still being written
            return scan
        i = skip_ws(text, m.end())
        if i >= len(text):
            return scan
        if text[i] != ":":
            scan.broken = True
            return scan
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return scan
        end = value_end(text, i)
        try:
            key = json.loads(m.group())
        except ValueError:
            scan.broken = True
            return scan
        scan.values[key] = (i, end)
        if end is None:
            return scan
        i = end


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with (a marker in the making)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
