"""Pure parts of infera.scaling: the arithmetic checker, answer extraction and voting,
resampling, the task sets."""
from __future__ import annotations

import json
import random
import re

import pytest

from infera.eval.tasks import arithmetic_tasks, load_jsonl, load_tasks
from infera.scaling.answers import AnswerExtractor, answers_equal, group_answers, last_boxed
from infera.scaling.arithmetic_checker import check_claims, step_score
from infera.scaling.search import aggregate
from infera.scaling.particle_filtering import resample, weights
from infera.scaling.selection import argmax, vote


@pytest.mark.parametrize("text, holds", [
    ("23 + 19 = 42", [True]),
    ("23 + 19 = 43", [False]),
    ("So 85 - 37 = 48 books are left.", [True]),
    ("85 - 37 = 58", [False]),
    ("3 × $4.50 = $13.50", [True]),
    ("6 × 7 = 48", [False]),
    ("1,200 ÷ 4 = 300", [True]),
    ("1,234 + 1 = 1,235", [True]),
    ("12 * 12 = 144 and 144 / 12 = 11", [True, False]),
    ("10 / 3 = 3.33", [True]),
    ("10 / 3 = 3.4", [False]),
    ("10 / 0 = 5", [False]),
    ("2 + 3 * 4 = 14", [True]),
    ("2 + 3 * 4 = 20", [False]),
    ("45 - 12 + 30 = 63", [True]),
    ("0.5 * 8 = 4", [True]),
    ("7 * -2 = -14", [True]),
    ("85 x 3 = 255", [True]),
    ("Let's add the apples together.", []),
])
def test_arithmetic_checker_claims(text, holds):
    assert [c.holds for c in check_claims(text)] == holds


def test_arithmetic_step_score():
    assert step_score("First, 23 + 19 = 42.\n\n") == 1.0
    assert step_score("First, 23 + 19 = 41.\n\n") == 0.0
    assert step_score("12 + 3 = 15, then 15 - 4 = 12.") == 0.5
    assert step_score("We need the total.") == 1.0  # nothing claimed, nothing wrong


def test_answer_extraction():
    extract = AnswerExtractor()
    assert extract("so the answer is \\boxed{42}.") == "42"
    assert extract("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{x^{2}+1}") == "x^{2}+1"
    assert extract("23 + 19 = 42, so Tom has 42 apples.") == "42"
    assert extract("She has 1,234 coins.") == "1234"
    assert extract("no number") is None
    assert extract.marked("23 + 19 = 42") is None  # a solution without \boxed{} has not marked an answer
    custom = AnswerExtractor(r"Answer: (\w+)", fallback_last_number=False)
    assert custom("Answer: yes ... Answer: no") == "no"
    assert custom("42") is None
    with pytest.raises(ValueError, match="answer_pattern"):
        AnswerExtractor("(unclosed")


def test_answer_equality_and_groups():
    assert answers_equal("42", "42.0")
    assert answers_equal("1,000", "1000")
    assert answers_equal("\\frac{1}{2}", "0.5")  # math-verify
    assert not answers_equal("42", "43")
    assert not answers_equal(None, "1")
    assert group_answers(["42", "0.5", "42.0", None, "\\frac{1}{2}", None]) == [[0, 2], [1, 4], [3], [5]]


def test_selection():
    assert argmax([0.1, 0.9, 0.9, 0.2]) == 1  # the first on ties
    winners, votes = vote(["3", "4", "3.0", None, "4", "4"])
    assert winners == [1, 4, 5] and votes == {"3": 2.0, "4": 3.0}
    winners, totals = vote(["3", "4", "3"], [0.9, 0.5, 0.8])
    assert winners == [0, 2] and totals == pytest.approx({"3": 1.7, "4": 0.5})
    assert vote([None, None])[0] == [0]  # nobody answered: the first candidate
    assert aggregate([0.5, 0.2, 0.8], "last") == 0.8
    assert aggregate([0.5, 0.2, 0.8], "min") == 0.2
    assert aggregate([0.5, 0.2, 0.8], "product") == pytest.approx(0.08)


def test_weights_softmax_of_logits():
    w = weights([0.2, 0.5, 0.8], 1.0)
    assert w == pytest.approx([0.25 / 5.25, 1 / 5.25, 4 / 5.25])  # odds r / (1 - r), normalized
    assert weights([0.2, 0.8], 2.0) == pytest.approx([0.2, 0.8])  # temperature 2: square roots of the odds 1/4, 4
    assert sum(weights([0.0, 1.0, 1.0], 1.0)) == pytest.approx(1.0)  # clipped, no infinities


def test_resample_multinomial_matches_weights():
    """Chi-square goodness of fit over 20,000 draws (fixed seed); 16.27 is the p = 0.001 critical
    value for 3 degrees of freedom, so a correct sampler fails this once in a thousand seeds."""
    w = [0.1, 0.2, 0.3, 0.4]
    counts = resample(w, 20_000, random.Random(7))
    assert sum(counts) == 20_000
    chi2 = sum((c - 20_000 * p) ** 2 / (20_000 * p) for c, p in zip(counts, w))
    assert chi2 < 16.27


def test_arithmetic_tasks_are_seeded_and_right():
    tasks = arithmetic_tasks(30, seed=3)
    assert tasks == arithmetic_tasks(30, seed=3) and tasks != arithmetic_tasks(30, seed=4)
    for t in tasks:
        numbers = [int(n) for n in re.findall(r"\d+", t.question)]
        kind = "gives" in t.question and "buys" in t.question
        if kind:  # two steps: a - b + c
            expected = numbers[0] - numbers[1] + numbers[2]
        elif any(v in t.question for v in ("gives away", "sells", "loses")):
            expected = numbers[0] - numbers[1]
        else:
            expected = numbers[0] + numbers[1]
        assert t.answer == str(expected)
        # the worked solution: steps a blank line apart, every claim true, the answer boxed
        steps = t.solution.split("\n\n")
        assert len(steps) == (3 if kind else 2) and all(step_score(s) == 1.0 for s in steps[:-1])
        assert all(check_claims(s) for s in steps[:-1]) and last_boxed(t.solution) == t.answer
    problems, examples = load_tasks("arithmetic", 5, num_examples=3)
    assert len(problems) == 5 and len(examples) == 3
    assert not {q for q, _ in examples} & {t.question for t in load_tasks("arithmetic", 200)[0]}


def test_jsonl_tasks(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"question": "1+1?", "answer": 2}), "", json.dumps({"question": "2+2?", "answer": "4"})]
    path.write_text("\n".join(lines))
    assert [(t.question, t.answer) for t in load_tasks(f"jsonl:{path}")[0]] == [("1+1?", "2"), ("2+2?", "4")]
    lines[0] = json.dumps({"question": "1+1?", "answer": 2, "solution": "1 + 1 = 2.\n\n\\boxed{2}"})
    path.write_text("\n".join(lines))
    problems, examples = load_tasks(f"jsonl:{path}", num_examples=1)  # an example is not also a problem
    assert [t.question for t in problems] == ["2+2?"] and examples == [("1+1?", "1 + 1 = 2.\n\n\\boxed{2}")]
    with pytest.raises(ValueError, match='2 examples asked for, but only 1 lines have a "solution"'):
        load_tasks(f"jsonl:{path}", num_examples=2)
    path.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:1: expected an object"):
        load_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"tasks.jsonl:1: not valid JSON"):
        load_jsonl(path)
    with pytest.raises(ValueError, match="unknown task"):
        load_tasks("gsm8k")
