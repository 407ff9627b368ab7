"""Sampler: filtered distributions (statistical, fixed seed), seeds, penalties, validation."""
from __future__ import annotations

import math

import pytest
import torch

from infera.engine.sequence import Sequence
from infera.engine.sampler import Sampler
from infera.sampling_params import SamplingParams, StructuredOutputParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
EOS = 7


def draw(params: SamplingParams, n: int = 24000, sampler: Sampler | None = None) -> torch.Tensor:
    sampler = sampler or Sampler(len(LOGITS), torch.device("cpu"), {EOS}, seed=0)
    counts = torch.zeros(len(LOGITS))
    rows = 2000
    for _ in range(n // rows):
        seqs = [Sequence([1, 2, 3], params) for _ in range(rows)]
        tokens, _ = sampler(LOGITS.expand(rows, -1).clone(), seqs)
        counts += torch.bincount(torch.tensor(tokens), minlength=len(LOGITS))
    return counts / n


def expected(params: SamplingParams) -> torch.Tensor:
    """The filtered distribution, computed independently of the sampler's code."""
    p = torch.softmax(LOGITS / params.temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if params.top_k:
        keep &= p >= p.sort(descending=True).values[params.top_k - 1]
    if params.top_p < 1:
        q = torch.softmax(torch.where(keep, LOGITS / params.temperature, -math.inf), -1)
        order = q.argsort(descending=True)
        mass, kept = 0.0, torch.zeros_like(keep)
        for i in order.tolist():  # smallest prefix whose mass reaches top_p
            kept[i] = True
            mass += q[i].item()
            if mass >= params.top_p:
                break
        keep &= kept
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if params.min_p:
        p = torch.where(p >= params.min_p * p.max(), p, 0.0)
        p = p / p.sum()
    return p


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.2),
], ids=["plain", "temp0.5", "top_k3", "top_p0.7", "k5_p0.9_t0.8", "min_p0.2"])
def test_sampled_frequencies_match_filtered_distribution(params):
    """Each token's frequency within 5 standard errors of its probability (24k draws);
    filtered-out tokens never drawn."""
    n = 24000
    freq, p = draw(params, n), expected(params)
    sigma = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() <= 5 * sigma + 1e-12), (freq, p)
    assert torch.all(freq[p == 0] == 0)


def test_greedy_is_argmax():
    sampler = Sampler(len(LOGITS), torch.device("cpu"), {EOS})
    tokens, _ = sampler(LOGITS.expand(3, -1).clone(), [Sequence([1], SamplingParams(temperature=0)) for _ in range(3)])
    assert tokens == [0, 0, 0]


def test_seed_reproducible_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)

    def run(batch_size: int) -> list[int]:
        sampler = Sampler(len(LOGITS), torch.device("cpu"), {EOS}, seed=batch_size)
        seq = Sequence([1], params)
        others = [Sequence([1], SamplingParams(temperature=1.0)) for _ in range(batch_size - 1)]
        out = []
        for _ in range(20):
            tokens, _ = sampler(LOGITS.expand(batch_size, -1).clone(), others + [seq])
            out.append(tokens[-1])
            seq.append_token(tokens[-1])
        return out

    assert run(1) == run(7) == run(3)


def test_penalties_change_the_choice():
    sampler = Sampler(len(LOGITS), torch.device("cpu"), {EOS})
    for params in (SamplingParams(temperature=0, frequency_penalty=1.0),
                   SamplingParams(temperature=0, presence_penalty=1.0),
                   SamplingParams(temperature=0, repetition_penalty=2.0)):
        seq = Sequence([5], params)
        seq.append_token(0)  # token 0 (the argmax) was already generated
        tokens, _ = sampler(LOGITS.unsqueeze(0).clone(), [seq])
        assert tokens == [1], params
    # the repetition penalty also covers prompt tokens
    seq = Sequence([0], SamplingParams(temperature=0, repetition_penalty=2.0))
    assert sampler(LOGITS.unsqueeze(0).clone(), [seq])[0] == [1]


def test_min_tokens_suppresses_eos():
    logits = LOGITS.clone()
    logits[EOS] = 10.0
    sampler = Sampler(len(LOGITS), torch.device("cpu"), {EOS})
    seq = Sequence([1], SamplingParams(temperature=0, min_tokens=2))
    assert sampler(logits.unsqueeze(0).clone(), [seq])[0] == [0]
    seq.token_ids += [0, 0]
    assert sampler(logits.unsqueeze(0).clone(), [seq])[0] == [EOS]


def test_logprobs_are_the_models():
    sampler = Sampler(len(LOGITS), torch.device("cpu"), {EOS})
    seq = Sequence([1], SamplingParams(temperature=0.5, logprobs=3, seed=1))
    (token,), (lp,) = sampler(LOGITS.unsqueeze(0).clone(), [seq])
    ref = torch.log_softmax(LOGITS, -1)
    assert lp.token_id == token and abs(lp.logprob - ref[token].item()) < 1e-6
    assert [t for t, _ in lp.top] == [0, 1, 2] and lp.rank == int((ref > ref[token]).sum()) + 1


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", -1),
    ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1), ("seed", 2**70), ("stop", [""]), ("stop_token_ids", [-3]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_structured_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams()
    assert StructuredOutputParams(json_object=True).json_object
