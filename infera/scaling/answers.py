"""Final answers: extract them from a solution's text, compare them, group equal ones.

The default extraction takes the last ``\\boxed{...}`` (braces may nest); failing that, the last
number in the text.  Equality is numeric for plain numbers and ``math-verify`` (symbolic)
otherwise, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` are one answer.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

import re2

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_BOXED = "\\boxed{"
MAX_PATTERN_CHARS = 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.dot_nl = True  # as re.DOTALL
_RE2_OPTIONS.log_errors = False  # the ValueError says it


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed)."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED):i - 1].strip()
        start = text.rfind(_BOXED, 0, start)  # unclosed: try an earlier one
    return None


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1] if found else None


def normalize(answer: str) -> str:
    """Drop what does not change a final answer: ``$``, spaces, thousands separators, a trailing period."""
    a = answer.strip().strip("$").strip().rstrip(".").strip()
    a = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", a)
    if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", a):
        a = a.replace(",", "")
    return a.replace(" ", "")


def _as_float(answer: str) -> float | None:
    try:
        return float(answer)
    except ValueError:
        return None


@dataclass
class AnswerExtractor:
    """``pattern``: a regex whose first group (or whole match) is the answer, last match wins;
    None means ``\\boxed{...}``.  ``fallback_last_number``: with no match, take the last number.

    Patterns run on RE2 (linear time in the text: a pattern from a client cannot backtrack
    catastrophically), so backreferences and lookaround are refused."""

    pattern: str | None = None
    fallback_last_number: bool = True

    def __post_init__(self) -> None:
        if self.pattern is not None:
            if len(self.pattern) > MAX_PATTERN_CHARS:
                raise ValueError(f"answer_pattern has {len(self.pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
            try:
                self._regex = re2.compile(self.pattern, _RE2_OPTIONS)
            except re2.error as e:
                detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
                raise ValueError(f"answer_pattern is not a regular expression RE2 accepts (no backreferences or "
                                 f"lookaround): {detail}") from None

    def marked(self, text: str) -> str | None:
        """The answer the pattern marks (no fallback): a solution that has one is complete."""
        if self.pattern is None:
            return last_boxed(text)
        matches = list(self._regex.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()

    def __call__(self, text: str) -> str | None:
        answer = self.marked(text)
        if answer is None and self.fallback_last_number:
            answer = last_number(text)
        return None if answer is None else normalize(answer) or None


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same: numerically, textually, or by math-verify."""
    if a is None or b is None:
        return False
    a, b = normalize(a), normalize(b)
    if a == b:
        return True
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return abs(fa - fb) <= 1e-6 * max(1.0, abs(fa), abs(fb))
    return _math_verify(a, b)


def _math_verify(a: str, b: str) -> bool:
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which works in the main thread only
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold = parse(f"${a}$", parsing_timeout=timeout)
        pred = parse(f"${b}$", parsing_timeout=timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an answer math-verify cannot read equals nothing else
        return False


def group_answers(answers: list[str | None]) -> list[list[int]]:
    """Indices of ``answers`` grouped by equality, groups in order of first appearance
    (a missing answer is a group of its own)."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        for g in groups:
            if a is not None and answers_equal(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups
