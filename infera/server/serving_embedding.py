"""``/v1/embeddings`` over the async engine: each input is a pooling request, scheduled with the
generation requests (chunked prefill, KV cache, preemption) and finished once its prompt is computed;
its final hidden states pooled as ``--pooler-config`` says (default: the last token's, L2-normalized)."""
from __future__ import annotations

import base64
import dataclasses
import time

import numpy as np

from infera.outputs import RequestOutput
from infera.pooling_params import PoolingParams
from infera.server.protocol import OpenAIError, UsageInfo, random_id
from infera.server.protocol_embedding import EmbeddingRequest, EmbeddingResponse, EmbeddingResponseData
from infera.server.serving import OpenAIServing


class OpenAIServingEmbedding:
    """Embeddings through the submission, deadline, metrics and access log of ``serving`` (the
    completions' and chat's)."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.pooling = PoolingParams.from_json(serving.options.pooler_config)

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        arrival = time.monotonic()
        serving = self.serving
        serving.check_model(req.model)
        if req.dimensions is not None:
            # as vLLM for a model without matryoshka representations: truncating would make poor embeddings
            raise OpenAIError(400, f"dimensions: the model `{serving.model_name}` does not support matryoshka "
                                   f"representation; changing output dimensions would lead to poor results",
                              param="dimensions")
        tokenizer = serving.tokenizer
        prompts = [tokenizer.encode(p, add_special_tokens=req.add_special_tokens) if isinstance(p, str) else list(p)
                   for p in req.inputs]
        for ids in prompts:
            try:
                serving.engine.check_prompt_length(len(ids), generates=False)
            except ValueError as e:
                raise OpenAIError(400, f"input: {e}", param="input", code="context_length_exceeded") from None
        params = self.pooling if req.normalize is None else dataclasses.replace(self.pooling, normalize=req.normalize)
        request_id = random_id("embd")
        streams = await serving.submit(req, prompts, params, request_id, "input")
        final: dict[int, RequestOutput] = {}
        try:
            async for i, out in serving.outputs(streams, prompts, arrival, req.user):
                final[i] = out
        finally:
            for stream in streams:
                stream.close()
        data = [EmbeddingResponseData(index=i, embedding=_encode(final[i].embedding, req.encoding_format))
                for i in range(len(prompts))]
        num_tokens = sum(len(p) for p in prompts)
        return EmbeddingResponse(id=request_id, model=serving.model_name, data=data,
                                 usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens))


def _encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    """``base64``: the little-endian float32 bytes, base64-encoded, as OpenAI sends them."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode()
    return embedding
