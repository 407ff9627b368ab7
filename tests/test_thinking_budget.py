"""Budget forcing of a reasoning model's thinking in the engine (the server's is in test_server_tools.py)."""
from __future__ import annotations

import pytest

from infera import SamplingParams
from infera.engine.thinking_budget import END_TEXT


def test_thinking_is_cut_at_the_budget(tiny_llm):
    tokenizer = tiny_llm.engine.tokenizer
    prompt = tokenizer.encode("Question: what is 2 + 3?\n<think>\n")
    free = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    cut = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     max_thinking_tokens=4))[0].outputs[0]
    end = tokenizer.encode(END_TEXT, add_special_tokens=False)
    assert "</think>" not in free.text
    assert cut.token_ids[:4] == free.token_ids[:4] and cut.token_ids[4:4 + len(end)] == end
    assert len(cut.token_ids) == 20 and cut.text.count("</think>") == 1


def test_an_output_that_does_not_think_is_left_alone(tiny_llm):
    prompt = tiny_llm.engine.tokenizer.encode("Question: what is 2 + 3?\nAnswer:")
    params = dict(temperature=0, max_tokens=12, ignore_eos=True)
    free = tiny_llm.generate([prompt], SamplingParams(**params))[0].outputs[0]
    cut = tiny_llm.generate([prompt], SamplingParams(max_thinking_tokens=2, **params))[0].outputs[0]
    assert cut.token_ids == free.token_ids


def test_bad_budget_is_a_value_error():
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        SamplingParams(max_thinking_tokens=0)
