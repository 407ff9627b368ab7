"""Hermes-style tool calls (Qwen2.5, Qwen3, Hermes 2/3): after any content, one block per call,
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``.

Qwen2.5-Coder often writes its call as a fenced JSON block instead (```` ```json\n{"name": ...,
"arguments": {...}}\n``` ````, a known habit of that model family): an output that starts
with such a block (after whitespace, if any) is that one call (the rest is dropped, as after a
``</tool_call>``); while it may still become one it is held back, and a fence of anything else is
content."""
from __future__ import annotations

from infera.server.tool_parsers.abstract_tool_parser import ToolCallsParse, ToolParser
from infera.server.tool_parsers.utils import skip_ws


class Hermes2ProToolParser(ToolParser):
    name = "hermes"
    template_markers = ("<tool_call>",)
    call_begin = '<tool_call>\n{{"name": {name}, "arguments": '
    call_end = "}\n</tool_call>"
    separator = "\n"
    START = "<tool_call>"
    FENCES = ("```json\n", "```\n")

    def parse(self, text: str, final: bool) -> ToolCallsParse:
        fenced = self._fenced(text, final)
        if fenced is not None:
            return fenced
        content, i = self.split_content(text, self.START, final)
        calls = []
        while i is not None:
            block, end = self.calls_from(text, i + len(self.START), "")
            calls += block
            i = text.find(self.START, end) if end is not None else -1
            if i < 0:
                break
        return self.finish(text, content, calls, final)

    def _fenced(self, text: str, final: bool) -> ToolCallsParse | None:
        """The parse of an output that is (or may still become) a fenced call; None for any other."""
        i = skip_ws(text, 0)
        fence = next((f for f in self.FENCES if text.startswith(f, i)), None)
        if fence is None:
            begun = i < len(text) and any(f.startswith(text[i:]) for f in self.FENCES)
            return ToolCallsParse("") if begun and not final else None
        start = skip_ws(text, i + len(fence))
        if start == len(text):
            return None if final else ToolCallsParse("")
        if text[start] != "{":
            return None
        calls, end = self.calls_from(text, start, "")
        if calls:  # what follows the call (the closing fence) is not content
            return ToolCallsParse("", calls)
        return None if end is not None or final else ToolCallsParse("")  # an object but no call: content
