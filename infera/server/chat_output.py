"""One chat choice's generated text as the response's message: its reasoning, content and tool
calls, whole (:meth:`ChatOutputParser.message`) or as the deltas of a stream
(:meth:`ChatOutputParser.deltas`), which add up to the same message."""
from __future__ import annotations

from dataclasses import dataclass, field

from infera.server.protocol import (AssistantMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                    ToolCall)
from infera.server.reasoning_parser import ReasoningParser
from infera.server.tool_parsers import ToolCallText, ToolParser


@dataclass
class ParsedChat:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallText] = field(default_factory=list)


class ChatOutputParser:
    """``reasoning``: splits off the thinking; ``tools``: finds tool calls (None: the text is content);
    ``parallel_tool_calls``: False keeps the first call only."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, parallel_tool_calls: bool = True):
        self.reasoning = reasoning
        self.tools = tools
        self.parallel_tool_calls = parallel_tool_calls
        self.text = ""
        self.sent = ParsedChat()  # what the deltas so far carried
        self.ids: list[str] = []  # the tool calls' ids, made as they appear

    def parse(self, text: str, final: bool) -> ParsedChat:
        reasoning, rest = self.reasoning.parse(text, final) if self.reasoning else (None, text)
        if self.tools is None:
            return ParsedChat(reasoning or "", rest)
        parsed = self.tools.parse(rest, final)
        calls = parsed.tool_calls if self.parallel_tool_calls else parsed.tool_calls[:1]
        while len(self.ids) < len(calls):
            self.ids.append(self.tools.call_id())
        return ParsedChat(reasoning or "", parsed.content, calls)

    def message(self, text: str) -> AssistantMessage:
        """The whole output's message (content None when it holds only tool calls or reasoning)."""
        parsed = self.parse(text, final=True)
        calls = [ToolCall(id=i, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for i, c in zip(self.ids, parsed.tool_calls)]
        return AssistantMessage(content=parsed.content or (None if calls or parsed.reasoning else ""),
                                reasoning_content=parsed.reasoning or None, reasoning=parsed.reasoning or None,
                                tool_calls=calls)

    def deltas(self, new_text: str, final: bool) -> list[DeltaMessage]:
        """What ``new_text`` (appended to the output; ``final``: the output is complete) adds: reasoning,
        content and new calls' id and name in one delta, then their arguments' growth in another."""
        self.text += new_text
        now, sent = self.parse(self.text, final), self.sent
        reasoning, content = now.reasoning[len(sent.reasoning):], now.content[len(sent.content):]
        named = [DeltaToolCall(index=i, id=self.ids[i], type="function", function=DeltaFunctionCall(
            name=now.tool_calls[i].name, arguments="")) for i in range(len(sent.tool_calls), len(now.tool_calls))]
        grown = [DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=c.arguments[len(before):]))
                 for i, (c, before) in enumerate(zip(now.tool_calls, [t.arguments for t in sent.tool_calls]
                                                     + [""] * len(named))) if len(c.arguments) > len(before)]
        self.sent = ParsedChat(now.reasoning, now.content, [ToolCallText(c.name, c.arguments) for c in now.tool_calls])
        out = []
        if reasoning or content or named:
            out.append(DeltaMessage(content=content or None, reasoning_content=reasoning or None,
                                    reasoning=reasoning or None, tool_calls=named or None))
        if grown:
            out.append(DeltaMessage(tool_calls=grown))
        return out

    @property
    def called(self) -> bool:
        """Whether the output (so far) holds tool calls."""
        return bool(self.ids)
