"""The OpenAI embeddings API's request and response bodies (plus vLLM's extras); the shared pieces
and bounds are in :mod:`infera.server.protocol`."""
from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from infera.server.protocol import MAX_USER_CHARS, OpenAIModel, UsageInfo, prompt_list


class EmbeddingRequest(OpenAIModel):
    """``input``: a string, strings, token ids or lists of token ids (at most MAX_PROMPTS inputs)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    # vLLM's extras
    normalize: bool | None = None  # None: the server's --pooler-config
    add_special_tokens: bool = True
    constraint_field: ClassVar[None] = None  # no output constraint (named where a refused request is answered)

    @model_validator(mode="after")
    def _check_embedding(self) -> EmbeddingRequest:
        prompt_list("input", self.input)
        return self

    @property
    def inputs(self) -> list[str | list[int]]:
        """The input field as a list of inputs, each text or token ids."""
        return prompt_list("input", self.input)


class EmbeddingResponseData(OpenAIModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI's encoding_format base64


class EmbeddingResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo
