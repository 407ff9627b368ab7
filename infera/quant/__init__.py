"""Quantized weights: GGUF blocks run natively, and quantizers for float models.

Methods (``--quantization``, ``infera quantize --method``):

======================  ==============================================================
``gguf``                a GGUF file's own tensors, packed (the default for GGUF models)
``q8_0 q4_0 q4_1``      GGUF block formats as quantizers
``int8``                int8, one scale per output channel (round-to-nearest)
``int4``                int4 with groups along input channels per output channel
``int4_ic``             int4 with groups along output channels per input channel
``llm_int8``            int8 plus LLM.int8() outlier features in float
``dense_sparse``        int4 groups plus exact sparse outliers (SqueezeLLM)
``trit_planes``         two ternary planes per weight (PTQTP)
======================  ==============================================================

Every quantizer keeps the vocabulary embedding and LM head in Q8_0 (as llama.cpp does).
"""
from __future__ import annotations

import importlib
from typing import Any

from infera.quant.base import QuantizationConfig

QUANTIZERS = {  # method -> (module, class) of its Quantizer
    "int8": ("int8", "Int8Quantizer"),
    "int4": ("int4", "Int4Quantizer"),
    "int4_ic": ("int4_ic", "Int4ICQuantizer"),
    "llm_int8": ("llm_int8", "LLMInt8Quantizer"),
    "dense_sparse": ("dense_sparse", "DenseSparseQuantizer"),
    "trit_planes": ("trit_planes", "TritPlaneQuantizer"),
}
GGUF_BLOCK_METHODS = ("q8_0", "q4_0", "q4_1")
QUANTIZATION_METHODS = ("gguf", *GGUF_BLOCK_METHODS, *QUANTIZERS)
CONFIG_FILE = "quantization_config.json"


def quantization_config(method: str, from_checkpoint: bool = False, **options: Any) -> QuantizationConfig:
    """The config of ``method`` (ValueError naming the method or option if unknown)."""
    from infera.quant.gguf_blocks import GGUFBlockQuantizer, GGUFConfig
    from infera.quant.method import WeightQuantConfig

    if method == "gguf":
        if options:
            raise ValueError(f"quantization gguf takes no options, got {', '.join(options)}")
        return GGUFConfig()
    if method in GGUF_BLOCK_METHODS:
        if options:
            raise ValueError(f"quantization {method} takes no options, got {', '.join(options)}")
        return WeightQuantConfig(GGUFBlockQuantizer(method), from_checkpoint)
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {', '.join(QUANTIZATION_METHODS)}")
    module, cls = QUANTIZERS[method]
    quantizer_cls = getattr(importlib.import_module(f"infera.quant.{module}"), cls)
    try:
        quantizer = quantizer_cls(**options)
    except TypeError as e:
        raise ValueError(f"quantization {method}: bad options {options}: {e}") from None
    return WeightQuantConfig(quantizer, from_checkpoint)
