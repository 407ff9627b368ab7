"""The engine loop: requests in, one scheduled step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from infera.config import EngineConfig
from infera.engine.kv_policy import KVPolicy
from infera.engine.model_runner import StepOutput
from infera.engine.output_processor import OutputProcessor
from infera.engine.scheduler import Scheduler
from infera.engine.sequence import Sequence, SequenceStatus
from infera.engine.spec_decoder import SpecDecoder, build_proposer
from infera.engine.step_hook import StepHook
from infera.engine.thinking_budget import ThinkingBudget
from infera.engine.worker import Worker
from infera.outputs import RequestMetrics, RequestOutput, TokenLogprobs
from infera.pooling_params import PoolingParams
from infera.quant.layout import kernel_paths
from infera.quant.method import weight_bytes
from infera.sampling_params import SamplingParams
from infera.structured import StructuredOutputManager

logger = logging.getLogger("infera")


def check_prompt_length(num_tokens: int, max_model_len: int, generates: bool = True) -> None:
    """ValueError for an empty prompt or one past the context (``generates``: with room for a token)."""
    if num_tokens == 0:
        raise ValueError("the prompt is empty")
    if num_tokens + generates > max_model_len:
        raise ValueError(f"the prompt has {num_tokens} tokens but the context length is {max_model_len} "
                         f"tokens" + (" (room must remain for at least one generated token)" if generates else ""))


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    retain: bool = False  # finished sequences keep their KV blocks until LLMEngine.release()
    num_computed_prompt_tokens: int = 0  # prompt tokens computed for it (cache and fork hits excluded)
    embedding: list[float] | None = None  # a pooling request's, once its prompt is computed

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finish_reason is not None for s in self.seqs)


class EngineDriver(Protocol):
    """Runs requests from inside the engine loop (a scaling search, say): before each step it may
    add, continue or release sequences; after it, it sees the step's outputs (the ``before_step``
    and ``after_step`` points of :class:`StepHook`, called before the engine's own hooks)."""

    @property
    def num_waiting(self) -> int:
        """Work submitted and not started yet (counts toward the engine's waiting requests)."""

    def has_work(self) -> bool: ...

    def before_step(self) -> None: ...

    def after_step(self, outputs: list[RequestOutput]) -> None: ...


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config or EngineConfig.from_kwargs(**kwargs)
        cfg = self.config
        started = time.monotonic()
        self.worker = Worker(cfg)
        self.model_path, self.hf_config = self.worker.model_path, self.worker.hf_config
        self.tokenizer, self.runner = self.worker.tokenizer, self.worker.runner
        self.block_manager, self.max_model_len = self.worker.block_manager, self.worker.max_model_len
        self.device, self.dtype = self.worker.device, self.worker.dtype
        self.default_sampling_params = self.worker.default_sampling_params  # --generation-config
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   kv_policy=KVPolicy(cfg.kv_policy, cfg.kv_budget, cfg.kv_sink_tokens))
        if cfg.kv_policy != "none":
            logger.info("KV policy %s: budget %s, %d sink tokens", cfg.kv_policy, cfg.kv_budget, cfg.kv_sink_tokens)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.hooks: list[StepHook] = []
        self.structured = StructuredOutputManager(self.tokenizer, self.runner.vocab_size, self.output_processor)
        self.add_hook(self.structured)
        self.thinking_budget = ThinkingBudget(self.tokenizer, self.output_processor)
        self.add_hook(self.thinking_budget)
        self.spec: SpecDecoder | None = None
        if cfg.speculative is not None:
            proposer = build_proposer(cfg.speculative, self.worker)
            self.runner.return_top_tokens = proposer.wants_top_tokens
            self.spec = SpecDecoder(proposer, self.worker, self.scheduler, cfg.num_speculative_tokens)
            self.add_hook(self.spec)
            logger.info("speculative decoding: %s, up to %d draft tokens per sequence and step",
                        cfg.speculative, cfg.num_speculative_tokens)
        self.requests: dict[str, Request] = {}
        self.drivers: list[EngineDriver] = []
        self.num_prompt_tokens = 0  # prompt tokens computed (prefix-cache hits excluded)
        self.num_generated_tokens = 0
        self._ids = itertools.count()
        self.weight_bytes = weight_bytes(self.runner.model)
        quantization = self.worker.quantization
        logger.info("loaded %s: %s, %.0f MiB of weights (%s), %s on %s, in %.1fs", self.model_path,
                    (self.hf_config.architectures or ["?"])[0], self.weight_bytes / 2**20,
                    quantization.name if quantization else "unquantized", str(self.dtype).removeprefix("torch."),
                    self.device, time.monotonic() - started)
        if quantization and self.device.type == "cpu":
            logger.info(kernel_paths())
        logger.info("KV cache (%s): %d blocks x %d tokens = %d tokens (%.2f GiB); max_model_len %d; "
                    "up to %d tokens and %d sequences per step; prefix caching %s",
                    str(self.runner.kv_cache.dtype).removeprefix("torch."), self.runner.num_blocks,
                    cfg.block_size, self.runner.num_blocks * cfg.block_size, self.runner.kv_cache.num_bytes / 2**30,
                    self.max_model_len, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                    "on" if self.block_manager.enable_prefix_caching else "off")
        if groups := self.runner.kv_cache.num_window_groups:
            logger.info("hybrid KV cache: a block holds a block of one of %d KV-cache groups (the full-attention "
                        "layers, and %d groups of sliding-window layers, window %d): one sequence's context may "
                        "reach %d tokens", groups + 1, groups, self.runner.kv_cache.sliding_window,
                        self.worker.kv_cache_tokens)
        if kv := self.runner.kv_cache.num_host_blocks:
            logger.info("KV offloading: %d host blocks = %d tokens (%.2f GiB) as a second tier of the prefix cache",
                        kv, kv * cfg.block_size, kv * self.runner.kv_cache.bytes_per_block / 2**30)

    def add_hook(self, hook: StepHook) -> None:
        """Attach a feature to the named points of every step (see :class:`StepHook`)."""
        self.hooks.append(hook)

    def _at(self, point: str) -> list[Callable]:
        """The drivers' and hooks' methods for ``point`` of a step, in the order they are called."""
        return [f for h in (*self.drivers, *self.hooks) if (f := getattr(h, point, None)) is not None]

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | PoolingParams | None = None,
                    request_id: str | None = None, *, parent: Sequence | None = None, retain: bool = False) -> str:
        """Queue a prompt (text or token ids). Raises ValueError for a prompt that cannot run.

        :class:`PoolingParams`: an embedding request, scheduled like any prompt (chunked, preemptible,
        its KV in the cache) and finished once its prompt is computed, its output's ``embedding`` set.

        ``parent``: a sequence holding KV blocks (e.g. one kept by ``retain``); every sample of the
        new request shares its blocks for the longest common prefix of ``prompt`` and ``parent``
        (copy-on-write), so only the rest of the prompt is computed.  ``retain``: the request's
        sequences keep their KV blocks when they finish, for later requests to continue from, until
        :meth:`release` (or an abort of the still-running request) frees them.
        """
        pooling = params if isinstance(params, PoolingParams) else None
        params = SamplingParams() if pooling is not None or params is None else params
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.runner.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size}), got {bad[:3]}")
        self.check_prompt_length(len(token_ids), generates=pooling is None)
        if parent is not None and pooling is not None:
            raise ValueError("a pooling request cannot continue from a parent sequence")
        vocab = self.runner.vocab_size
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab}), got {bad[:3]}")
        if parent is not None and params.structured is not None:
            raise ValueError("structured output cannot continue from a parent sequence")
        self.scheduler.kv_policy.for_request(params.kv_policy, params.kv_budget, params.kv_sink_tokens)  # ValueError
        grammar = self.structured.grammar_for(params)  # ValueError for a bad schema/regex/grammar
        req = Request(request_id, text, token_ids, params, retain=retain)
        if parent is not None:
            req.seqs = [self._share_prefix(parent, token_ids, params, request_id, i) for i in range(params.n)]
            self.requests[request_id] = req
            return request_id
        first = Sequence(token_ids, params, request_id, 0)
        first.pooling = pooling
        # n > 1: compute the prompt once, then fork it (see _maybe_fork)
        first.hold_last_token = params.n > 1 and len(token_ids) > 1
        req.seqs.append(first)
        if params.n > 1 and not first.hold_last_token:
            req.seqs += [Sequence(token_ids, params, request_id, i) for i in range(1, params.n)]
        self.requests[request_id] = req
        for seq in req.seqs:
            if grammar is not None:
                self.structured.add(seq, grammar)  # held back until its grammar has compiled
            else:
                self.scheduler.add(seq)
        return request_id

    def check_prompt_length(self, num_tokens: int, generates: bool = True) -> None:
        check_prompt_length(num_tokens, self.max_model_len, generates)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self._finish(seq)
            elif req.retain:
                self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free the KV blocks still held by a finished sequence of a retained request."""
        if seq.status != SequenceStatus.FINISHED:
            raise ValueError(f"sequence {seq.seq_id} has not finished; abort its request instead")
        self.block_manager.free(seq)

    def _share_prefix(self, parent: Sequence, token_ids: list[int], params: SamplingParams, request_id: str,
                      index: int) -> Sequence:
        """A sequence of ``token_ids`` sharing ``parent``'s blocks for their common computed prefix."""
        seq = Sequence(token_ids, params, request_id, index)
        self.block_manager.fork(parent, seq)
        limit, shared = min(seq.num_computed_tokens, len(token_ids) - 1), 0  # leave one token to compute
        while shared < limit and token_ids[shared] == parent.token_ids[shared]:
            shared += 1
        self.block_manager.truncate(seq, shared)
        seq.num_cached_tokens = shared
        if seq.block_table:
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)
        return seq

    def fork(self, seq: Sequence, index: int) -> Sequence:
        """A new running sequence that shares all of ``seq``'s KV blocks (copy-on-write)."""
        child = Sequence(seq.token_ids, seq.params, seq.request_id, index)
        child.num_prompt_tokens = seq.num_prompt_tokens
        child.logprobs = list(seq.logprobs)
        if seq.sampler_state is not None:
            child.sampler_state = seq.sampler_state.fork()
        if seq.detok_state is not None:
            child.detok_state = seq.detok_state.fork()
        if seq.grammar_state is not None:
            child.grammar_state = seq.grammar_state.fork()
        self.block_manager.fork(seq, child)
        self.scheduler.add_running(child)
        return child

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or any(driver.has_work() for driver in self.drivers)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's name), e.g. between benchmark runs; only while no
        sequence holds KV blocks."""
        self.block_manager.reset_prefix_cache()

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return an output for every request that advanced."""
        for before_step in self._at("before_step"):
            before_step()
        for admit in self._at("admit"):
            for seq in admit(idle=not self.scheduler.has_unfinished()):
                self.scheduler.add(seq)
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: KV cache too small for any waiting sequence")
            return []
        started = time.perf_counter()
        results = self.runner.execute(batch, self.structured.bitmask)
        seconds = time.perf_counter() - started
        for after_forward in self._at("after_forward"):
            after_forward(batch, seconds)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        failed: dict[str, Exception] = {}
        for seq, n, out in zip(batch.seqs, batch.num_new_tokens, results):
            req = self.requests.get(seq.request_id)
            if req is None or req.request_id in failed:
                continue
            try:
                if self._update(req, seq, n, out, now):
                    touched[req.request_id] = req
            except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
                logger.exception("request %s failed in a step; aborting it", req.request_id)
                failed[req.request_id] = e
        outputs = []
        for rid, error in failed.items():
            req = self.requests[rid]
            self.abort_request(rid)
            touched.pop(rid, None)
            out = self.make_output(req)
            out.error = f"{type(error).__name__}: {error}"
            outputs.append(out)
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            outputs.append(self.make_output(req))
        for after_step in self._at("after_step"):
            after_step(outputs)
        return outputs

    def _update(self, req: Request, seq: Sequence, n: int, out: StepOutput, now: float) -> bool:
        """Account one scheduled sequence's step; True if it generated tokens (or, with max_tokens 0,
        finished its prompt)."""
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = now
            req.metrics.num_cached_tokens = seq.num_cached_tokens
        draft = seq.spec_token_ids
        seq.clear_drafts()
        self.block_manager.commit(seq, n - len(draft))  # the drafts' KV counts once they are accepted
        computed_prompt = max(0, min(n, seq.num_prompt_tokens - seq.num_computed_tokens + n))
        self.num_prompt_tokens += computed_prompt
        req.num_computed_prompt_tokens += computed_prompt
        if out.prompt_logprobs:
            req.prompt_logprobs.extend(out.prompt_logprobs)
        if out.embedding is not None:
            req.embedding = out.embedding
            seq.finish_reason = "stop"
            self._finish(seq)
            return True
        if out.token_id is not None and req.params.max_tokens == 0:  # the prompt only: its sampled token is dropped
            seq.finish_reason = "length"
            self._finish(seq, keep_blocks=req.retain)
        elif out.token_id is not None:
            last = seq.token_ids[-1]
            self.num_generated_tokens += self._append_tokens(seq, draft, out)
            for after_sampling in self._at("after_sampling"):
                after_sampling(seq, [last, *draft[:out.num_accepted]], draft, out)
            if seq.finish_reason is not None:
                self._finish(seq, keep_blocks=req.retain)  # a retained sequence's blocks stay (see release)
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.last_token_time = now
        if seq.hold_last_token and seq.num_computed_tokens == seq.compute_target:
            seq.hold_last_token = False
            req.seqs += [self.fork(seq, i) for i in range(1, req.params.n)]
        return out.token_id is not None

    def _append_tokens(self, seq: Sequence, draft: list[int], out: StepOutput) -> int:
        """Append the step's tokens to ``seq`` one at a time until it stops: the accepted drafts,
        then the sampled token.  Returns the number of tokens generated (those the hooks append
        after them, e.g. grammar-forced ones, included)."""
        tokens = [*zip(draft[:out.num_accepted], out.accepted_logprobs), (out.token_id, out.logprobs)]
        on_token = self._at("on_token")
        generated = 0
        for i, (token_id, logprobs) in enumerate(tokens):
            self.output_processor.append_token(seq, token_id, logprobs)
            generated += 1 + sum(f(seq, last=i == len(tokens) - 1) for f in on_token)
            if seq.finish_reason is not None:
                break
        return generated

    def _finish(self, seq: Sequence, keep_blocks: bool = False) -> None:
        """``seq`` finished or was aborted: out of the scheduler (its blocks freed unless ``keep_blocks``)."""
        self.scheduler.finish(seq, keep_blocks)
        for on_finish in self._at("on_finish"):
            on_finish(seq)

    def make_output(self, req: Request) -> RequestOutput:
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *req.prompt_logprobs]
        completions = sorted((OutputProcessor.completion(s) for s in req.seqs), key=lambda c: c.index)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, req.finished,
                             prompt_logprobs, req.metrics, embedding=req.embedding)

    @property
    def stats(self) -> dict[str, float]:
        s, bm = self.scheduler, self.block_manager
        # sequences waiting for a slot or for their grammar, and drivers' work not started yet
        waiting = len(s.waiting) + len(self.structured.waiting) + sum(d.num_waiting for d in self.drivers)
        stats = {"running": len(s.running), "waiting": waiting, "kv_cache_usage": bm.usage,
                 "preemptions": s.num_preemptions, "prefix_queries": s.prefix_queries, "prefix_hits": s.prefix_hits}
        if bm.host is not None:
            stats.update(kv_offloaded_blocks=bm.num_offloaded_blocks, kv_loaded_blocks=bm.num_loaded_blocks)
        if self.spec is not None:
            stats.update(self.spec.stats)
        return stats

