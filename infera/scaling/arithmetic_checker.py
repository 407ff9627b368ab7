"""A built-in verifier: check every ``a op b = c`` claim written in a reasoning step.

A claim is a chain of numbers joined by ``+ - * / × ÷`` (or `` x `` between spaces), then
``=``, then a number: ``23 + 19 = 42``, ``3 × $4.50 = $13.50``, ``1,200 / 4 = 300``.  The
left side is evaluated with the usual precedence; the claim holds if it equals the right side
to the precision written there (``10 / 3 = 3.33`` holds, ``23 + 19 = 43`` does not).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NUM = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\$?\.\d+"
_OP = r"[-+*/×÷−–]|(?<=\s)[xX](?=\s)"
CLAIM = re.compile(rf"(?<![\w.,$])((?:{_NUM})(?:\s*(?:{_OP})\s*-?(?:{_NUM}))+)\s*=\s*(-?(?:{_NUM}))(?![\d.]\d)")
_TOKEN = re.compile(rf"({_NUM})|({_OP})")
_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "x": "*", "X": "*", "/": "/", "÷": "/"}


@dataclass
class Claim:
    text: str
    value: float | None  # the left side evaluated (None: division by zero)
    claimed: float
    holds: bool


def _number(token: str) -> float:
    return float(token.replace("$", "").replace(",", ""))


def _evaluate(expression: str) -> float | None:
    """A chain ``n (op n)*`` with * and / before + and -; None on division by zero."""
    numbers: list[float] = []
    ops: list[str] = []
    negate = False
    for m in _TOKEN.finditer(expression):
        num, op = m.groups()
        if num is not None:
            numbers.append(-_number(num) if negate else _number(num))
            negate = False
        elif len(ops) < len(numbers):
            ops.append(_OPS[op])
        else:  # an operator right after an operator: a sign
            negate = _OPS[op] == "-"
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):
        if op in "*/":
            if op == "/" and n == 0:
                return None
            terms[-1] = terms[-1] * n if op == "*" else terms[-1] / n
        else:
            terms.append(n)
            signs.append(op)
    total = terms[0]
    for sign, t in zip(signs, terms[1:]):
        total = total + t if sign == "+" else total - t
    return total


def _decimals(token: str) -> int:
    return len(token.split(".", 1)[1]) if "." in token else 0


def check_claims(text: str) -> list[Claim]:
    """Every arithmetic claim in ``text``, checked."""
    claims = []
    for m in CLAIM.finditer(text):
        lhs, rhs = m.group(1), m.group(2)
        value, claimed = _evaluate(lhs), _number(rhs)
        tolerance = 0.5 * 10 ** -_decimals(rhs) + 1e-9 * max(1.0, abs(claimed))
        claims.append(Claim(m.group(0), value, claimed, value is not None and abs(value - claimed) <= tolerance))
    return claims


def step_score(text: str) -> float:
    """The fraction of the step's claims that hold (1.0 for a step that claims nothing)."""
    claims = check_claims(text)
    if not claims:
        return 1.0
    return sum(c.holds for c in claims) / len(claims)
