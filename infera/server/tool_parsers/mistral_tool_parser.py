"""Mistral tool calls: content, then ``[TOOL_CALLS]`` and a JSON array of ``{"name": ..., "arguments": {...}}``.
``[TOOL_CALLS]`` is a special token in Mistral's vocabularies, so the text keeps special tokens, and
call ids are 9 letters and digits, which Mistral's chat templates require."""
from __future__ import annotations

import random
import string
from typing import Any

from infera.server.tool_parsers.abstract_tool_parser import ToolCallsParse, ToolParser
from infera.server.tool_parsers.utils import skip_ws


class MistralToolParser(ToolParser):
    name = "mistral"
    template_markers = ("[TOOL_CALLS]",)
    call_begin = '{{"name": {name}, "arguments": '
    call_end = "}"
    separator = ", "
    keeps_special_tokens = True
    START = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> ToolCallsParse:
        content, i = self.split_content(text, self.START, final)
        calls = []
        if i is not None:
            j = skip_ws(text, i + len(self.START))
            calls, _ = self.calls_from(text, j + (text[j:j + 1] == "["), ",")
        return self.finish(text, content, calls, final)

    def call_id(self) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))

    def calls_format(self, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> dict[str, Any]:
        return {"type": "sequence", "elements": [{"type": "const_string", "value": self.START + "["},
                                                 self.call_tags(functions, parallel),
                                                 {"type": "const_string", "value": "]"}]}
