"""Offline API: ``LLM(model=...).generate(prompts, params)``, ``LLM.chat(messages)`` and ``LLM.embed(prompts)``."""
from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from infera.engine.llm_engine import LLMEngine
from infera.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from infera.pooling_params import PoolingParams
from infera.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """An engine plus a batch front: submit everything, step until done, return in order."""

    def __init__(self, model: str | None = None, **engine_options: Any):
        self.engine = LLMEngine(model=model, **engine_options)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in submission order.  Without
        ``params``, the model's sampling defaults (``generation_config``) apply."""
        params = params if params is not None else SamplingParams(**self.engine.default_sampling_params)
        return self._run(self._add_requests(prompts, params, SamplingParams), use_tqdm)

    def embed(self, prompts: Prompt | Seq[Prompt], pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (text or token ids), in submission order: the final hidden states
        pooled as ``pooling_params`` say (default: the last token's, L2-normalized, as vLLM)."""
        outputs = self._run(self._add_requests(prompts, pooling_params, PoolingParams), use_tqdm)
        return [EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding))
                for o in outputs]

    def _add_requests(self, prompts: Prompt | Seq[Prompt], params: Any, kind: type) -> list[str]:
        """Queue every prompt with its ``kind`` of params (one for all, or one each); their request ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, kind):
            params = [params or kind()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} {kind.__name__}")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def chat(self, messages: list[Message] | list[list[Message]],
             params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs)
                   for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        engine = self.engine
        started, prompt0, gen0 = time.perf_counter(), engine.num_prompt_tokens, engine.num_generated_tokens
        while pending:
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"prefill {(engine.num_prompt_tokens - prompt0) / elapsed:.0f} tok/s, "
                                f"output {(engine.num_generated_tokens - gen0) / elapsed:.0f} tok/s", refresh=False)
        bar.close()
        return [done[i] for i in ids]
