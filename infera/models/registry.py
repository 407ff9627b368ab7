"""Which model class runs which HF architecture."""
from __future__ import annotations

from torch import nn

from infera.models.gemma3 import Gemma3ForCausalLM
from infera.models.llama import LlamaForCausalLM, MixtralForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}") from None


def runs_sliding_windows(config) -> bool:
    """Whether ``config``'s model class runs its sliding-window layers (else the engine keeps every
    sequence inside the window)."""
    cls = MODEL_REGISTRY.get((config.architectures or ["?"])[0])
    return bool(getattr(cls, "sliding_window_attention", False))
