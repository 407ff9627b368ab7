"""The model's tokenizer and chat template (transformers), plus incremental detokenization."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PretrainedConfig

from infera.loader.errors import ModelLoadError


class Tokenizer:
    def __init__(self, path: Path, config: PretrainedConfig):
        try:
            self.hf = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({e})") from None
        self.eos_token_ids = _eos_ids(path, config, self.hf)
        self.vocab_size = len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, **kwargs)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def decode_stream(self, skip_special_tokens: bool) -> DecodeStream:
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def step_stream(self, stream: DecodeStream, token_id: int) -> str:
        return stream.step(self.hf.backend_tokenizer, token_id) or ""


def _eos_ids(path: Path, config: PretrainedConfig, hf: Any) -> set[int]:
    ids: set[int] = set()
    for source in (config.eos_token_id, hf.eos_token_id, _generation_eos(path)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _generation_eos(path: Path) -> Any:
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return None
