"""The native decoder stack (csrc/decoder_layer.cpp) against the modules it replaces: the same
hidden states and KV cache contents, bit for bit, on decode batches of single- and multi-token
queries, for each model variant, dtype, int8 or 16-bit KV cache and quantized weight format, at every ISA
level."""
from __future__ import annotations

import pytest
import torch

from infera.engine.llm_engine import LLMEngine
from infera.engine.sequence import Sequence
from infera.layers.attention import attention_metadata
from infera.models import llama_native
from infera.sampling_params import SamplingParams

CASES = [  # kind, dtype, options
    ("llama", "float32", {}),
    ("qwen2", "float32", {}),  # QKV bias
    ("qwen3", "bfloat16", {}),  # per-head q/k norms
    ("llama3_rope", "bfloat16", {"kv_cache_dtype": "int8"}),
    ("qwen2", "float32", {"kv_cache_dtype": "float16"}),  # a 16-bit cache under float32 activations
    ("llama", "float32", {"quantization": "q4_0"}),
    ("llama", "bfloat16", {"quantization": "llm_int8"}),  # outliers kept in float
    ("llama", "float32", {"quantization": "dense_sparse"}),  # exact sparse term
    ("llama", "float32", {"quantization": "int4_ic"}),  # per-IC groups
    ("mixtral", "float32", {}),  # mixtures of experts
    ("qwen2_moe", "bfloat16", {}),  # a shared expert
    ("qwen3_moe", "bfloat16", {}),  # a dense layer among sparse ones
    ("mixtral", "bfloat16", {"quantization": "int8"}),  # int8 experts
]


def decode_hidden(engine: LLMEngine, seqs: list[Sequence], counts: list[int], native: bool,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hidden states of one batch of short queries, and every layer's K/V cache afterwards."""
    runner = engine.runner
    monkeypatch.setattr(llama_native, "ENABLED", native)
    ids, pos, meta = runner.prepare_inputs(seqs, counts)
    with torch.inference_mode(), attention_metadata(meta):
        hidden = runner.model(ids, pos)
    pool = runner.kv_cache
    return hidden, [pool.data.clone()] + ([pool.scales.clone()] if pool.scales is not None else [])


@pytest.mark.parametrize("kind,dtype,options", CASES)
def test_native_stack_equals_modules(tiny_model, kind, dtype, options, monkeypatch, isa):
    engine = LLMEngine(model=str(tiny_model(kind)), dtype=dtype, kv_cache_memory="16MiB", **options)
    g = torch.Generator().manual_seed(0)
    lens = [5, 40, 19, 150]
    seqs = [Sequence(torch.randint(3, 1000, (n + 10,), generator=g).tolist(), SamplingParams()) for n in lens]
    bm = engine.block_manager
    for seq, n in zip(seqs, lens):  # the prompts, through the modules
        assert bm.allocate_slots(seq, n)
        decode_hidden(engine, [seq], [n], False, monkeypatch)
        bm.commit(seq, n)
    # a decode step, speculative-verification-like queries, one sequence's decode step (one token)
    for batch, counts in ((seqs, [1, 1, 1, 1]), (seqs, [1, 3, 1, 9]), (seqs[1:2], [1])):
        for seq, c in zip(batch, counts):
            assert bm.allocate_slots(seq, c)
        ref, ref_cache = decode_hidden(engine, batch, counts, False, monkeypatch)
        ours, cache = decode_hidden(engine, batch, counts, True, monkeypatch)
        stacks = engine.runner.model.model.native_decoder.stacks
        assert stacks and all(stack is not None for stack in stacks.values()), "the native stack did not run"
        assert torch.equal(ours, ref)
        assert all(torch.equal(a, b) for a, b in zip(cache, ref_cache))
        for seq, c in zip(batch, counts):
            bm.commit(seq, c)
