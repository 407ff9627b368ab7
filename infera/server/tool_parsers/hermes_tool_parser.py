"""Hermes-style tool calls (Qwen2.5, Qwen3, Hermes 2/3): after any content, one block per call,
``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``."""
from __future__ import annotations

from infera.server.tool_parsers.abstract_tool_parser import ToolCallsParse, ToolParser


class Hermes2ProToolParser(ToolParser):
    name = "hermes"
    template_markers = ("<tool_call>",)
    call_begin = '<tool_call>\n{{"name": {name}, "arguments": '
    call_end = "}\n</tool_call>"
    separator = "\n"
    START = "<tool_call>"

    def parse(self, text: str, final: bool) -> ToolCallsParse:
        content, i = self.split_content(text, self.START, final)
        calls = []
        while i is not None:
            block, end = self.calls_from(text, i + len(self.START), "")
            calls += block
            i = text.find(self.START, end) if end is not None else -1
            if i < 0:
                break
        return self.finish(text, content, calls, final)
