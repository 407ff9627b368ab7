"""Process and outcome reward models from an HF directory, run by infera's own model code.

A ``*ForTokenClassification`` checkpoint on a Llama-family backbone (Llama, Mistral, Qwen2,
Qwen3) is a process reward model (PRM): a step's score is the positive label's probability at
the step's last token.  A ``*ForSequenceClassification`` checkpoint is an outcome reward model
(ORM): one score, at the last token.  The input is the question, a blank line, then the steps
(each ending with its delimiter, as generated).  The backbone is :class:`LlamaModel` on its own
worker (a small paged KV cache with prefix caching), so scoring a branch again after one more step
computes only the new step.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from infera.config import EngineConfig
from infera.engine.sequence import Sequence
from infera.engine.worker import Worker
from infera.layers.linear import Linear
from infera.loader.errors import ModelLoadError
from infera.loader.gguf_file import GGUFFile
from infera.loader.model_loader import load_weights
from infera.loader.safetensors_dir import SafetensorsDir
from infera.models.llama import LlamaForCausalLM, LlamaModel
from infera.sampling_params import SamplingParams
from infera.scaling.rewards import Reward, Scores

if TYPE_CHECKING:
    from infera.scaling.search import Branch, Search

BACKBONES = ("llama", "mistral", "qwen2", "qwen3")
HEADS = {"ForTokenClassification": True, "ForSequenceClassification": False}  # -> scores steps
MAX_BATCH_TOKENS = 2048


class RewardHeadModel(nn.Module):
    """The decoder and a linear ``score`` head (HF's names, so checkpoints load as they are)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: PretrainedConfig, max_position: int, process: bool):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position)
        bias = process and getattr(config, "token_classification_bias", True)
        self.score = Linear(config.hidden_size, config.num_labels, bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        return self.model(input_ids, positions, skip_layers)


class RewardModel(Reward):
    """A PRM or ORM (see the module docstring).  ``positive_label``: the label whose probability
    is the score when there are several (a single label is read through a sigmoid)."""

    aggregate = "product"

    def __init__(self, path: str | Path, dtype: str = "auto", device: str = "auto", kv_cache_memory: str = "256MiB",
                 positive_label: int = 1, block_size: int = 16):
        self.positive_label = positive_label
        config = EngineConfig(model=str(path), dtype=dtype, device=device, kv_cache_memory=kv_cache_memory,
                              block_size=block_size)
        self.worker = Worker(config, self._load)
        self.model, self.tokenizer = self.worker.runner.model, self.worker.tokenizer
        self.runner, self.blocks = self.worker.runner, self.worker.block_manager
        self.max_len = self.worker.hf_config.max_position_embeddings
        self._lock = threading.Lock()  # one model, perhaps shared by searches on several engines

    def _load(self, source: GGUFFile | SafetensorsDir, config: PretrainedConfig, dtype: torch.dtype,
              device: torch.device, max_position: int) -> RewardHeadModel:
        """The head model of the checkpoint in ``source`` (the worker's model factory)."""
        arch = (config.architectures or ["?"])[0]
        head = next((h for h in HEADS if arch.endswith(h)), None)
        if not isinstance(source, SafetensorsDir) or head is None or config.model_type not in BACKBONES:
            raise ModelLoadError(f"{source.path}: {arch} ({config.model_type}) is not a reward model infera runs; "
                                 f"it needs an HF directory with a token- or sequence-classification head on a "
                                 f"{'/'.join(BACKBONES)} backbone")
        self.process = HEADS[head]
        self.aggregate = "product" if self.process else "last"
        if config.num_labels > 1 and not 0 <= self.positive_label < config.num_labels:
            raise ValueError(f"positive_label {self.positive_label} is not one of the model's "
                             f"{config.num_labels} labels")
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = RewardHeadModel(config, max_position, self.process)
        finally:
            torch.set_default_dtype(default)
        load_weights(model, source.weights(), str(source.path))
        return model.eval()

    # -- inputs -------------------------------------------------------------------------------
    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the question and steps, and the position of each step's last token."""
        ids = self.tokenizer.encode(f"{question}\n\n")
        ends = []
        for step in steps:
            ids += self.tokenizer.encode(step, add_special_tokens=False)
            ends.append(len(ids) - 1)
        return ids, ends

    def _probability(self, logits: torch.Tensor) -> list[float]:
        logits = logits.float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).tolist()
        return torch.softmax(logits, dim=-1)[:, self.positive_label].tolist()

    # -- scoring ------------------------------------------------------------------------------
    def step_scores(self, question: str, steps: list[str]) -> list[float]:
        """Every step's score (a PRM) or the one outcome score (an ORM) of one solution."""
        return self._scores([(question, steps, 0)])[0]

    def score(self, search: Search, branches: list[Branch]) -> Scores:
        return self._scores([(search.problem.question, list(b.steps), b.num_scored_steps) for b in branches])

    @torch.inference_mode()
    def _scores(self, items: list[tuple[str, list[str], int]]) -> Scores:
        """For each (question, steps, number already scored): the new scores."""
        wanted: list[tuple[Sequence, list[int]]] = []
        for question, steps, done in items:
            ids, ends = self.encode(question, steps)
            if len(ids) > self.max_len:
                raise ValueError(f"the reward model reads at most {self.max_len} tokens; a solution has {len(ids)}")
            wanted.append((Sequence(ids, SamplingParams()), ends[done:] if self.process else [len(ids) - 1]))
        with self._lock:
            hidden = self._forward(wanted)
        return [self._probability(self.model.score(h)) if len(h) else [] for h in hidden]

    def _forward(self, wanted: list[tuple[Sequence, list[int]]]) -> list[torch.Tensor]:
        """Hidden states at the wanted positions of each sequence, computed in batches of at most
        MAX_BATCH_TOKENS tokens; cached prefixes are reused (up to the first wanted position)."""
        out: list[torch.Tensor | None] = [None] * len(wanted)
        todo = list(range(len(wanted)))
        while todo:
            batch, counts, budget = [], [], MAX_BATCH_TOKENS
            for i in list(todo):
                seq, positions = wanted[i]
                first = positions[0] if positions else len(seq) - 1
                hits = self.blocks.get_computed_blocks(seq, first)
                n = len(seq) - len(hits) * self.blocks.block_size
                if batch and n > budget:
                    break
                if not self.blocks.allocate_slots(seq, n, hits):
                    if batch:
                        break
                    raise ValueError("the reward model's KV cache is too small for one solution; "
                                     "give it more kv_cache_memory")
                batch.append(i)
                counts.append(n)
                budget -= n
                todo.remove(i)
            seqs = [wanted[i][0] for i in batch]
            for i, seq, n, hidden in zip(batch, seqs, counts, self.runner.hidden_states(seqs, counts)):
                out[i] = hidden[[p - seq.num_computed_tokens for p in wanted[i][1]]]
                self.blocks.commit(seq, n)
                self.blocks.free(seq)
        return out


_loaded: dict[Path, RewardModel] = {}
_loading = threading.Lock()


def load_reward_model(path: str | Path) -> RewardModel:
    """The reward model in ``path``, loaded once per process; ValueError if it cannot load."""
    key = Path(path).expanduser().resolve()
    with _loading:
        if key not in _loaded:
            try:
                _loaded[key] = RewardModel(key)
            except (ModelLoadError, OSError) as e:
                raise ValueError(f"cannot load the reward model: {e}") from None
        return _loaded[key]
