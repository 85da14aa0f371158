"""Prometheus metrics for GET /metrics: request counts, tokens, latencies, and the engine's load.

Counters and histograms are updated on the event loop as requests finish; the engine's gauges are read
from its latest stats snapshot when scraped. Each app has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from textcomplete.api.limits import Admission
from textcomplete.engine.outputs import EngineStats

disable_created_metrics()   # no *_created series: they double the page and no dashboard here reads them
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], admission: Admission) -> None:
        self.stats, self.admission = stats, admission

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [
            ("textcomplete_requests_running", "Engine requests being computed.", s.running),
            ("textcomplete_requests_waiting", "Engine requests waiting for a place in the running batch.", s.waiting),
            ("textcomplete_requests_in_flight", "Engine requests admitted by the API and not yet finished.",
             self.admission.in_flight),
            ("textcomplete_kv_blocks_total", "KV cache blocks.", s.kv_blocks_total),
            ("textcomplete_kv_blocks_used", "KV cache blocks held by requests.", s.kv_blocks_used),
            ("textcomplete_kv_blocks_free", "KV cache blocks free to allocate (incl. cached ones no request holds).",
             s.kv_blocks_free),
            ("textcomplete_kv_blocks_cached", "KV cache blocks the prefix cache can serve.", s.kv_blocks_cached),
            ("textcomplete_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens "
             "looked up, since start.",
             s.prefix_cache_hit_tokens / s.prefix_cache_queried_tokens if s.prefix_cache_queried_tokens else 0.0),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("textcomplete_preemptions", "Requests preempted (their KV blocks reclaimed) to let others run.",
             s.preemptions),
            ("textcomplete_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queried_tokens),
            ("textcomplete_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
             s.prefix_cache_hit_tokens),
            ("textcomplete_prefix_cache_evictions", "Cached KV blocks evicted for reuse.", s.prefix_cache_evictions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], admission: Admission) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("textcomplete_http_requests", "HTTP requests answered, by path and status.",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("textcomplete_prompt_tokens", "Prompt tokens of finished completions.",
                                     registry=r)
        self.generation_tokens = Counter("textcomplete_generation_tokens", "Tokens generated (all candidates).",
                                         registry=r)
        self.time_to_first_token = Histogram("textcomplete_time_to_first_token_seconds",
                                             "From a completion request's arrival to each candidate's first token.",
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("textcomplete_inter_token_latency_seconds",
                                             "Time per generated token after the first, per candidate.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("textcomplete_request_duration_seconds",
                                          "From arrival to the last byte of a completion response.",
                                          buckets=_DURATION_BUCKETS, registry=r)
        r.register(_EngineCollector(stats, admission))

    def render(self) -> bytes:
        return generate_latest(self.registry)
