"""Prometheus metrics of one server, in a registry of its own (so several servers can share a process).

Updated from the engine thread after every step (prometheus_client is thread-safe) and from the
HTTP handlers for rejected requests; scraped at GET /metrics.
"""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("dsv3_requests_waiting", "Requests queued for the cache (admission control)", registry=r)
        self.running = Gauge("dsv3_requests_running", "Requests in the running batch", registry=r)
        self.cache_usage = Gauge("dsv3_cache_usage_ratio", "Fraction of latent-cache blocks held by requests",
                                 registry=r)
        self.cache_blocks = Gauge("dsv3_cache_blocks", "Latent-cache blocks by state", ["state"], registry=r)
        self.tokens_per_s = Gauge("dsv3_generation_tokens_per_second",
                                  f"Output tokens per second over the last {window_s:g} s", registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "Prompt tokens computed (prefill)", registry=r)
        self.cached_tokens = Counter("dsv3_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generated = Counter("dsv3_generation_tokens", "Output tokens generated", registry=r)
        self.preemptions = Counter("dsv3_preemptions", "Requests preempted for cache space", registry=r)
        self.requests = Counter("dsv3_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.http_errors = Counter("dsv3_http_errors", "Requests answered with an error", ["status"], registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "Arrival to first output token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("dsv3_inter_token_latency_seconds", "Time between output tokens of a request",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("dsv3_request_latency_seconds", "Arrival to last output token", buckets=_LATENCY,
                             registry=r)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens) of recent steps
        self._last_stats = (0, 0, 0, 0)

    def after_step(self, engine, new_tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, new_tokens))
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._recent) / self._window_s)
        st = engine.stats
        stats = (st.prefill_tokens, st.prefix_cached_tokens, st.generated_tokens, st.preemptions)
        for counter, new, old in zip((self.prompt_tokens, self.cached_tokens, self.generated, self.preemptions),
                                     stats, self._last_stats):
            if new > old:
                counter.inc(new - old)
        self._last_stats = stats
        self.observe_queues(engine)

    def observe_queues(self, engine) -> None:
        alloc = engine.cache.allocator
        self.waiting.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.cache_usage.set(alloc.num_used / alloc.num_blocks)
        self.cache_blocks.labels("used").set(alloc.num_used)
        self.cache_blocks.labels("free_cached").set(alloc.num_evictable)   # free, still holding a shared prefix
        self.cache_blocks.labels("free_blank").set(alloc.num_free - alloc.num_evictable)

    def render(self) -> bytes:
        return generate_latest(self.registry)
