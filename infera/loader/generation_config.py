"""The model's sampling defaults (vLLM's ``--generation-config``): from an HF directory's
``generation_config.json`` or a GGUF file's ``general.sampling.*`` metadata, by SamplingParams names.

A request that omits one of these fields gets the model's value instead of infera's default.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infera.loader.errors import ModelLoadError
from infera.sampling_params import SamplingParams

if TYPE_CHECKING:
    from infera.loader.gguf_file import GGUFFile
    from infera.loader.safetensors_dir import SafetensorsDir

# generation_config.json keys read, as vLLM reads them (max_new_tokens is the default max_tokens)
HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# llama.cpp's sampling metadata (gguf-py's Keys.General.SAMPLING_*)
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The sampling defaults in ``folder/generation_config.json`` ({} without that file)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return {name: config[key] for key, name in HF_KEYS.items() if config.get(key) is not None}


def gguf_sampling_defaults(fields: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults among a GGUF file's metadata ``fields`` (key -> value; float32 values
    rounded to the decimals they were written with)."""
    return {name: round(v, 6) if isinstance(v := fields[key], float) else v
            for key, name in GGUF_KEYS.items() if fields.get(key) is not None}


def sampling_defaults(setting: str, model: GGUFFile | SafetensorsDir) -> dict[str, Any]:
    """The defaults ``--generation-config`` chooses: ``auto`` the ``model``'s, ``vllm`` none
    (SamplingParams' own defaults), else those of the folder it names.  A value SamplingParams
    refuses is a ModelLoadError now, not a 400 on every request."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        defaults, source = model.generation_config(), f"{model.path}: the generation config"
    else:
        if not Path(setting).is_dir():
            raise ModelLoadError(f"--generation-config {setting}: not auto, vllm or a folder")
        defaults, source = read_generation_config(setting), f"{setting}/generation_config.json"
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e}") from None
    return dict(defaults)
