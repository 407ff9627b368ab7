"""Reward sources: a PRM / ORM from an HF directory run by infera's model code (checked against
HF transformers), the arithmetic checker and self-judging inside searches, bad reward specs."""
from __future__ import annotations

import shutil

import pytest
import torch

from infera.scaling import best_of_n, make_reward, particle_filtering
from infera.scaling.reward_model import RewardModel

QUESTION = "Tom has 23 apples and buys 19 more. How many apples does he have?"
STEPS = ["Tom starts with 23 apples.\n\n", "23 + 19 = 42\n\n", "The answer is \\boxed{42}."]


def make_reward_dir(root, kind: str, tokenizer_dir) -> str:
    from transformers import AutoConfig, LlamaForSequenceClassification, LlamaForTokenClassification

    path = root / kind
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, rms_norm_eps=1e-6,
                                  num_labels=2 if kind == "prm" else 1)
    torch.manual_seed(0)
    cls = LlamaForTokenClassification if kind == "prm" else LlamaForSequenceClassification
    model = cls(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return str(path)


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("reward-models")
    return {kind: make_reward_dir(root, kind, tokenizer_dir) for kind in ("prm", "orm")}


@torch.no_grad()
def hf_scores(path: str, kind: str, ids: list[int], ends: list[int]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForTokenClassification if kind == "prm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    logits = model(torch.tensor([ids])).logits
    if kind == "prm":
        return torch.softmax(logits[0, ends], dim=-1)[:, 1].tolist()
    return torch.sigmoid(logits[:, 0]).tolist()


@pytest.mark.parametrize("kind", ["prm", "orm"])
def test_reward_model_matches_transformers(reward_dirs, kind):
    rm = RewardModel(reward_dirs[kind], dtype="float32", kv_cache_memory="8MiB")
    assert rm.process == (kind == "prm")
    ids, ends = rm.encode(QUESTION, STEPS)
    expected = hf_scores(reward_dirs[kind], kind, ids, ends)
    assert len(expected) == (3 if kind == "prm" else 1)
    assert rm.step_scores(QUESTION, STEPS) == pytest.approx(expected, abs=1e-4)
    # again: the question and earlier steps now come from the reward model's prefix cache
    assert rm.step_scores(QUESTION, STEPS) == pytest.approx(expected, abs=1e-4)
    assert rm.blocks.num_free_blocks == rm.blocks.num_blocks


def test_prm_guides_a_search_with_prefix_cached_scoring(tiny_llm, reward_dirs):
    rm = RewardModel(reward_dirs["prm"], dtype="float32", kv_cache_memory="8MiB")
    result = particle_filtering(tiny_llm, QUESTION, budget=3, reward=rm, step_max_tokens=3, max_tokens=9, seed=2)
    for c in result.candidates:  # scored a step at a time during the search (prefix-cached) = scored at once
        assert len(c.steps) == len(c.step_scores) == 3
        assert c.step_scores == pytest.approx(rm.step_scores(QUESTION, c.steps), abs=1e-4)
        assert c.score == pytest.approx(c.step_scores[0] * c.step_scores[1] * c.step_scores[2])  # PRM: product
    assert rm.blocks.num_free_blocks == rm.blocks.num_blocks


def test_reward_specs(tiny_model, reward_dirs):
    assert make_reward(None) is None
    assert make_reward("arithmetic").aggregate == "min"
    assert type(make_reward("self")).__name__ == "SelfJudgeReward"
    assert make_reward(f"model:{reward_dirs['orm']}").process is False
    with pytest.raises(ValueError, match="is not a reward model infera runs"):
        make_reward(f"model:{tiny_model('llama')}")  # a causal LM
    with pytest.raises(ValueError, match="cannot load the reward model"):
        make_reward("model:/nonexistent/prm")
    with pytest.raises(ValueError, match="unknown reward source"):
        make_reward("oracle")


def test_arithmetic_reward_in_a_search(tiny_llm):
    """Random text makes no claims: every step scores 1; a scripted callable shows the aggregation."""
    result = best_of_n(tiny_llm, QUESTION, budget=3, reward="arithmetic", step_max_tokens=3, max_tokens=9, seed=3)
    assert all(c.step_scores == [1.0, 1.0, 1.0] and c.score == 1.0 for c in result.candidates)
