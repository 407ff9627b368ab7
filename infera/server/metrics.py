"""Prometheus metrics served at ``/metrics`` (names follow vLLM's, with the ``infera:`` prefix).

Latency histograms are observed per request from the engine's timestamps; engine state (running
and waiting requests, KV-cache usage, prefix-cache and token counters, preemptions) is read from
the async engine's latest stats snapshot at scrape time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from infera.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)

# engine stat -> (metric name, help, kind)
ENGINE_STATS = {
    "running": ("infera:num_requests_running", "Sequences running in the engine.", "gauge"),
    "waiting": ("infera:num_requests_waiting", "Sequences waiting to be scheduled (or for their grammar).",
                "gauge"),
    "kv_cache_usage": ("infera:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", "gauge"),
    "preemptions": ("infera:num_preemptions", "Sequences preempted for lack of KV blocks.", "counter"),
    "prefix_queries": ("infera:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_hits": ("infera:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter"),
    "kv_offloaded_blocks": ("infera:kv_offload_stored_blocks", "Cached KV blocks copied to the host tier when "
                            "evicted (--kv-offloading-size).", "counter"),
    "kv_loaded_blocks": ("infera:kv_offload_loaded_blocks", "KV blocks of prefix hits copied back from the host "
                         "tier instead of recomputed.", "counter"),
    "prompt_tokens": ("infera:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", "counter"),
    "generation_tokens": ("infera:generation_tokens", "Tokens generated.", "counter"),
    "spec_drafts": ("infera:spec_decode_num_drafts", "Speculative verifications (one sequence, one step).", "counter"),
    "spec_draft_tokens": ("infera:spec_decode_num_draft_tokens", "Draft tokens verified.", "counter"),
    "spec_accepted_tokens": ("infera:spec_decode_num_accepted_tokens", "Draft tokens accepted.", "counter"),
    "spec_acceptance_rate": ("infera:spec_decode_acceptance_rate", "Accepted / verified draft tokens (0 to 1).",
                             "gauge"),
    "spec_mean_acceptance_length": ("infera:spec_decode_mean_acceptance_length",
                                    "Tokens per verification: 1 + accepted drafts per verification.", "gauge"),
    "kv_transfer_requests": ("infera:kv_transfer_requests", "Prompts whose KV moved from a prefill to a decode "
                             "replica (disaggregated).", "counter"),
    "kv_transfer_blocks": ("infera:kv_transfer_blocks", "KV blocks moved from prefill to decode replicas.", "counter"),
    "kv_transfer_bytes": ("infera:kv_transfer_bytes", "KV bytes moved from prefill to decode replicas.", "counter"),
}


class EngineStatsCollector:
    """Exposes the engine's stats snapshot (a dict keyed like :data:`ENGINE_STATS`) at scrape time.
    With ``replica_stats`` (engine replicas), each metric has a ``replica`` label: each replica's
    value, and the engine's (the replicas' together) as ``replica="all"``."""

    def __init__(self, stats: Callable[[], dict[str, float]], model_name: str,
                 replica_stats: Callable[[], list[dict[str, float]]] | None = None):
        self.stats = stats
        self.replica_stats = replica_stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        replicas = {} if self.replica_stats is None else dict(enumerate(self.replica_stats()))
        labels = ["model_name", "replica"] if self.replica_stats is not None else ["model_name"]
        for key, (name, doc, kind) in ENGINE_STATS.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=labels)
            family.add_metric([self.model_name, "all"][:len(labels)], stats.get(key, 0))
            for i, replica in replicas.items():
                family.add_metric([self.model_name, str(i)], replica.get(key, 0))
            yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]], model_name: str,
                 replica_stats: Callable[[], list[dict[str, float]]] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats, model_name, replica_stats))
        labels = ["model_name"]
        self.ttft = Histogram("infera:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("infera:inter_token_latency_seconds", "Time between a request's engine outputs.",
                             labels, buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("infera:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter("infera:request_success", "Requests finished, by finish reason.",
                                [*labels, "finished_reason"], registry=self.registry)
        self.model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, arrival_time: float) -> RequestTracker:
        return RequestTracker(self, arrival_time)

    def count_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()


class RequestTracker:
    """Observes one engine request's latencies as its outputs arrive (engine clock: time.monotonic)."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float):
        self.metrics = metrics
        self.arrival_time = arrival_time
        self.num_tokens = 0
        self.last_time: float | None = None
        self.ttft: float | None = None

    def update(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is not None and out.finished and m.last_token_time is None and m.finished_time is not None:
            self._finished(out, m.finished_time)  # the prompt only (max_tokens 0): no token, no TTFT
            return
        if m is None or m.last_token_time is None or out.num_generated_tokens == self.num_tokens:
            return
        if self.last_time is None:
            self.ttft = m.first_token_time - self.arrival_time
            self.metrics.ttft.observe(self.ttft)
        else:
            self.metrics.itl.observe(m.last_token_time - self.last_time)
        self.num_tokens, self.last_time = out.num_generated_tokens, m.last_token_time
        if out.finished:
            self._finished(out, m.last_token_time)

    def _finished(self, out: RequestOutput, end: float) -> None:
        self.metrics.e2e.observe(end - self.arrival_time)
        for c in out.outputs:
            self.metrics.count_finished(c.finish_reason or "abort")
