"""Reasoning output: the thinking a model writes between ``<think>`` and ``</think>`` (DeepSeek-R1
and its distills, Qwen3, QwQ) goes to ``reasoning_content``; what follows is the answer.

The parser reads the whole output so far (like the tool parsers, see
:mod:`infera.server.tool_parsers.abstract_tool_parser`, and as monotonically).  Where the
prompt already opened the thinking (templates that end the generation prompt with ``<think>``),
the output starts inside it; otherwise a ``<think>`` at the start of the output opens it, and an
output without one has no reasoning.  An output that ends while thinking is all reasoning.

With an output constraint (structured output, or a forced tool choice) the constraint applies
after the thinking: :meth:`ReasoningParser.constrain` puts the thinking before it in one
structural tag.
"""
from __future__ import annotations

import json
from typing import Any

from infera.engine.thinking_budget import END, START
from infera.sampling_params import StructuredOutputParams
from infera.server.tool_parsers.utils import partial_suffix

THINK_SUFFIX = "\n\n"  # what these models write between </think> and the answer


class ReasoningParser:
    """``<think>…</think>`` reasoning; ``prompt_opened``: the prompt ends inside ``<think>``."""

    START = START
    END = END

    def __init__(self, prompt_opened: bool):
        self.prompt_opened = prompt_opened

    def parse(self, text: str, final: bool) -> tuple[str | None, str]:
        """(the reasoning, None if the output has none; the text after it), whitespace around both trimmed."""
        i = 0
        if not self.prompt_opened:
            rest = text.lstrip()
            if not rest.startswith(self.START):
                if not final and self.START.startswith(rest):
                    return None, ""  # undecided
                return None, text
            i = len(text) - len(rest) + len(self.START)
        j = text.find(self.END, i)
        if j >= 0:
            return text[i:j].strip(), text[j + len(self.END):].lstrip()
        body = text[i:] if final else text[i:len(text) - partial_suffix(text, self.END)]
        return body.strip(), ""

    def constrain(self, structured: StructuredOutputParams | dict[str, Any]) -> StructuredOutputParams:
        """A constraint that lets the thinking run free and applies ``structured`` (a constraint, or
        a structural-tag format) to what follows."""
        think = {"type": "tag", "begin": "" if self.prompt_opened else self.START,
                 "content": {"type": "any_text", "excludes": [self.START]}, "end": self.END}
        prefix = {"type": "sequence", "elements": [think, {"type": "const_string", "value": THINK_SUFFIX}]}
        if not self.prompt_opened:
            prefix = {"type": "optional", "content": prefix}
        after = structured if isinstance(structured, dict) else structural_format(structured)
        tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [prefix, after]}}
        return StructuredOutputParams(structural_tag=json.dumps(tag))


def structural_format(params: StructuredOutputParams) -> dict[str, Any]:
    """A constraint as a structural-tag format (a structural tag itself: its format)."""
    if params.structural_tag is not None:
        return json.loads(params.structural_tag)["format"]
    if params.json is not None or params.json_object:
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        # whitespace bounded (a json constraint alone allows none; here xgrammar's least is one at a time)
        return {"type": "json_schema", "json_schema": {"type": "object"} if params.json_object else schema,
                "max_whitespace_cnt": 1}
    if params.regex is not None:
        return {"type": "regex", "pattern": params.regex}
    if params.grammar is not None:
        return {"type": "grammar", "grammar": params.grammar}
    return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in params.choice]}


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {"deepseek_r1": ReasoningParser, "qwen3": ReasoningParser}
