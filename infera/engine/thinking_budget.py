"""Budget forcing for reasoning models (s1): a sequence that has thought for
``params.max_thinking_tokens`` tokens without closing its ``<think>`` gets the end of thinking
appended, as if it had written it, and answers from there.

The thinking is open from the start of the output when the prompt ends inside ``<think>``
(templates that open it), else from a ``<think>`` at the start of the output; an output that
starts otherwise has no thinking to cut.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from infera.engine.sequence import Sequence

if TYPE_CHECKING:
    from infera.engine.output_processor import OutputProcessor
    from infera.loader.tokenizer import Tokenizer

START, END = "<think>", "</think>"
END_TEXT = END + "\n\n"  # what these models write between </think> and the answer

def opens_thinking(tokenizer: Tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside ``<think>`` (a template that opens the thinking)."""
    return tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False).rstrip().endswith(START)


_NO_THINKING = -1  # a sequence's state: its output does not think (or has stopped thinking)


class ThinkingBudget:
    """A :class:`~infera.engine.step_hook.StepHook` (``on_token`` and ``on_finish``)."""

    def __init__(self, tokenizer: Tokenizer, output_processor: OutputProcessor):
        self.tokenizer, self.output_processor = tokenizer, output_processor
        self.end_ids = tokenizer.encode(END_TEXT, add_special_tokens=False)
        self._opened: dict[int, int] = {}  # seq_id -> output tokens when its thinking opened, or _NO_THINKING
        self.num_forced = 0  # sequences whose thinking was cut

    def on_token(self, seq: Sequence, last: bool) -> int:
        budget = seq.params.max_thinking_tokens
        if budget is None or seq.finish_reason is not None or not last:
            return 0
        opened = self._opened.get(seq.seq_id)
        if opened is None:
            opened = self._opening(seq)
            if opened is None:
                return 0
            self._opened[seq.seq_id] = opened
        if opened == _NO_THINKING:
            return 0
        text = seq.detok_state.text
        if END in text:
            self._opened[seq.seq_id] = _NO_THINKING
            return 0
        if seq.num_output_tokens - opened < budget:
            return 0
        self._opened[seq.seq_id] = _NO_THINKING
        self.num_forced += 1
        forced = 0
        for token_id in self.end_ids:
            if seq.grammar_state is not None and not seq.grammar_state.accept(token_id):
                break  # an output constraint that does not allow the end of thinking here keeps its say
            self.output_processor.append_token(seq, token_id, None)
            forced += 1
            if seq.finish_reason is not None:
                break
        return forced

    def _opening(self, seq: Sequence) -> int | None:
        """Output tokens before the thinking opened; _NO_THINKING if it does not; None: undecided
        (the output so far is a prefix of ``<think>``)."""
        n = seq.num_prompt_tokens
        if opens_thinking(self.tokenizer, seq.token_ids[max(0, n - 4):n]):
            return 0
        text = seq.detok_state.text.lstrip()
        if text.startswith(START):
            return seq.num_output_tokens
        return None if START.startswith(text) else _NO_THINKING

    def on_finish(self, seq: Sequence) -> None:
        self._opened.pop(seq.seq_id, None)
