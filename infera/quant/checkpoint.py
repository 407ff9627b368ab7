"""Write a quantized checkpoint (``infera quantize``): safetensors, config.json, tokenizer files and
``quantization_config.json``. ``--model DIR`` then loads it and runs it quantized.

Quantized layers are saved fused (``qkv_proj``, ``gate_up_proj``) under their parameter names:
``<layer>.weight`` for the main stored tensor and ``<layer>.weight_<name>`` for the others
(``weight_scales``, ``weight_mins``, ...); everything else is saved as float.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from infera.quant import CONFIG_FILE, quantization_config
from infera.quant.method import QuantizedLinearMethod

logger = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def quantize_checkpoint(model: str | None, method: str, out: str | Path, dtype: str = "float32",
                        **options: Any) -> dict[str, Any]:
    """Quantize ``model`` (a GGUF file, dequantized, or an HF directory) with ``method`` into ``out``.
    Returns a summary (tensor count, bytes before and after)."""
    from infera.config import DTYPES
    from infera.layers.linear import UnquantizedLinearMethod
    from infera.loader.model_loader import build_model, open_model

    if method == "gguf":
        raise ValueError("method gguf keeps a GGUF file's own tensors: load the GGUF file itself")
    config = quantization_config(method, **options)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype of the unquantized tensors must be float32 or bfloat16, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} exists and is not empty")
    source = open_model(model)
    hf_config = source.config()
    float_model = build_model(source, hf_config, torch.float32, torch.device("cpu"),
                              hf_config.max_position_embeddings)
    tied = getattr(float_model, "tie_word_embeddings", False)
    modules = [(n, m) for n, m in float_model.named_modules()
               if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod) and not (tied and n == "lm_head")]
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in tqdm(modules, desc=f"quantizing ({method})", unit="layer"):
        quant = config.get_quant_method(module)
        if isinstance(quant, QuantizedLinearMethod):
            quantized[name] = quant.quantizer.quantize(module.weight.data)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in float_model.named_parameters():  # tied weights once
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf == "weight":
            tensors.update({f"{prefix}.{QuantizedLinearMethod.param_name(k)}": v.contiguous()
                            for k, v in quantized[prefix].items()})
        else:
            tensors[name] = param.data.to(DTYPES[dtype]).contiguous()
    before = 2 * sum(p.numel() for p in float_model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "quantization": method})
    hf_config.save_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    for f in Path(source.tokenizer_dir()).iterdir():  # tokenizer files (an HF directory's: not its weights)
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in ("config.json", CONFIG_FILE):
            shutil.copy(f, out / f.name)
    after = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info("wrote %s: %d tensors, %.1f MiB (bfloat16 would be %.1f MiB)", out, len(tensors), after / 2**20,
                before / 2**20)
    return {"tensors": len(tensors), "bytes": after, "bfloat16_bytes": before, "config": config.to_dict()}
