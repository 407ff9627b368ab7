"""Per-request pooling parameters: how an embedding request's hidden states become one vector."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

PoolingType = Literal["LAST", "MEAN"]
POOLING_TYPES: tuple[str, ...] = ("LAST", "MEAN")


@dataclass
class PoolingParams:
    """vLLM's names: ``pooling_type`` LAST (the last prompt token's final hidden state, vLLM's
    default for decoder LLMs) or MEAN (the average over the prompt's tokens); ``normalize``: L2-
    normalized, as vLLM's embedding pooler does by default."""

    pooling_type: PoolingType = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def from_json(cls, text: str | None) -> PoolingParams:
        """A pooler config as vLLM's ``--pooler-config`` takes it: ``{"pooling_type": "MEAN", "normalize": false}``."""
        if text is None:
            return cls()
        try:
            config = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--pooler-config is not valid JSON: {e}") from None
        if not isinstance(config, dict) or set(config) - {"pooling_type", "normalize"}:
            raise ValueError(f"--pooler-config takes a JSON object with pooling_type and normalize, got {text}")
        return cls(**config)

    @property
    def needs_every_token(self) -> bool:
        """Whether every prompt token's hidden state is read (so no prefix-cache hit may skip one)."""
        return self.pooling_type == "MEAN"
