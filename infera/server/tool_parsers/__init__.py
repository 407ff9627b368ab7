"""Tool call parsers by name (``--tool-call-parser``, vLLM's names), and the one a chat template implies."""
from __future__ import annotations

from infera.server.tool_parsers.abstract_tool_parser import ToolCallsParse, ToolCallText, ToolParser
from infera.server.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from infera.server.tool_parsers.llama_tool_parser import Llama3JsonToolParser
from infera.server.tool_parsers.mistral_tool_parser import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (Hermes2ProToolParser, Llama3JsonToolParser, MistralToolParser)}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser whose format ``chat_template`` writes (None if it shows none)."""
    for name, cls in TOOL_PARSERS.items():
        if chat_template and any(marker in chat_template for marker in cls.template_markers):
            return name
    return None


__all__ = ["TOOL_PARSERS", "ToolCallText", "ToolCallsParse", "ToolParser", "detect_tool_parser"]
