"""Llama 3.1/3.2 JSON tool calls: the output is ``{"name": ..., "parameters": {...}}`` (optionally
after ``<|python_tag|>``), calls separated by ``;``; an output that starts otherwise is content."""
from __future__ import annotations

from infera.server.tool_parsers.abstract_tool_parser import ToolCallsParse, ToolParser
from infera.server.tool_parsers.utils import skip_ws


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    template_markers = ("<|python_tag|>", '"parameters": dictionary of argument name')
    call_begin = '{{"name": {name}, "parameters": '
    call_end = "}"
    separator = "; "
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ToolCallsParse:
        i = skip_ws(text, 0)
        if text.startswith(self.PYTHON_TAG, i):
            i = skip_ws(text, i + len(self.PYTHON_TAG))
        elif not final and self.PYTHON_TAG.startswith(text[i:]):  # nothing but whitespace, or the tag begun
            return ToolCallsParse("")
        if i < len(text) and text[i] != "{":
            return ToolCallsParse(text)
        calls, end = self.calls_from(text, i, ";")
        if not calls and end is not None:  # JSON without a name, then something else: content
            return ToolCallsParse(text)
        return self.finish(text, "", calls, final)
