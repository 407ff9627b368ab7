"""Read an HF model directory: config.json, *.safetensors (never pickles) and tokenizer files."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from infera.loader.errors import ModelLoadError
from infera.loader.generation_config import read_generation_config


class SafetensorsDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{self.path}: no config.json (expected a GGUF file or an HF model directory)")
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights (pickled .bin weights are not loaded)")

    def config(self) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(self.path)
        except Exception as e:
            raise ModelLoadError(f"{self.path / 'config.json'}: {e}") from None

    def generation_config(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json (see :mod:`infera.loader.generation_config`)."""
        return read_generation_config(self.path)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as e:
                raise ModelLoadError(f"{file}: {e}") from None

    def tokenizer_dir(self) -> Path:
        return self.path
