"""Qwen2.5-Coder-0.5B-Instruct Q4_K_M, a real file of the size users run (`make models` fetches it).

Tolerances: dequantized float32 logits vs HF transformers loading the same GGUF: max |diff| <= 1e-3
(measured 2.2e-5 with logits up to 32 on a Sapphire Rapids); the file's own packed tensors with int8
activation products: the greedy (argmax) token at >= 90% of positions equals HF's. Greedy output is
token-identical alone and in a batch at every vector ISA level, in float32 activations.
"""
from __future__ import annotations

import pytest
import torch

from conftest import engine_logits, hf_gguf_logits
from infera import LLM, SamplingParams
from infera.engine.llm_engine import LLMEngine
from infera.loader.model_store import cached_path

MODEL = "qwen2.5-coder-0.5b"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cached_path(MODEL).is_file(),
                                                   reason=f"{MODEL} is not downloaded (make models)")]
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 3
EDITS = ["def add(a, b):\n    return a + b\n# the same function with type hints:\n",
         "Rename the variable x to total:\nx = 0\nfor v in values:\n    x += v\n",
         "# a Python function that reverses a string\n",
         "class Stack:\n    def __init__(self):\n"]


@pytest.fixture(scope="module")
def hf_reference():
    return hf_gguf_logits(MODEL)


def test_dequantized_logits_match_hf(hf_reference):
    engine = LLMEngine(model=MODEL, dtype="float32", kv_cache_memory="256MiB")
    ids = engine.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref = hf_reference(ids)
    for chunks in ([len(ids)], [len(ids) - 5] + [1] * 5):
        ours = engine_logits(engine, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-3, f"chunks {chunks}: max |diff| {diff:.2e}"


def test_packed_tensors_agree_with_hf(hf_reference):
    engine = LLMEngine(model=MODEL, quantization="gguf", dtype="float32", kv_cache_memory="256MiB")
    ids = engine.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref = hf_reference(ids)
    ours = engine_logits(engine, ids, [len(ids)])
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"greedy tokens agree at {agree:.0%} of positions"


def test_greedy_identical_alone_and_batched(isa):
    if isa == "none":
        pytest.skip("the scalar level runs a 0.5B model for minutes; its kernels are tested on small shapes")
    llm = LLM(MODEL, quantization="gguf", dtype="float32", kv_cache_memory="256MiB")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in EDITS]
    batched = [o.outputs[0].token_ids for o in llm.generate(EDITS, params, use_tqdm=False)]
    assert batched == alone
