"""Prometheus metrics of one server, in a registry of its own (so several servers can share a process).

Updated from the engine thread after every step (prometheus_client is thread-safe) and from the
HTTP handlers for rejected requests; scraped at GET /metrics.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
         2.5, 10.0)


class StepHistogram:
    """A Histogram's observations of one engine step, added to it by `flush` at the step's end: one
    locked add per bucket touched, not one `observe` per token. /metrics reads the same samples as
    if each value had been observed (it may render between two buckets' adds, as it may inside
    `observe`). Reaches into prometheus_client's Histogram (`_upper_bounds`, `_buckets`, `_sum`),
    which has no observe-many; tests/test_serve_metrics.py checks it against `observe`."""

    def __init__(self, histogram: Histogram):
        self.histogram = histogram
        self._bounds = histogram._upper_bounds       # ascending, the last is +Inf
        self._counts = [0] * len(self._bounds)      # observations per bucket (not cumulative)
        self._sum = 0.0

    def observe(self, amount: float, n: int = 1) -> None:
        """`n` observations of `amount`."""
        self._counts[bisect_left(self._bounds, amount)] += n    # the first bucket with amount <= bound
        self._sum += amount * n

    def flush(self) -> None:
        h, counts = self.histogram, self._counts
        if self._sum:
            h._sum.inc(self._sum)
            self._sum = 0.0
        for i, n in enumerate(counts):
            if n:
                h._buckets[i].inc(n)
                counts[i] = 0


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
        self.placed = Counter("dsv3_data_parallel_requests", "Requests sent to each data-parallel attention group "
                              "(parallel.dp > 1)", ["group"], registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "Arrival to first output token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram(
            "dsv3_inter_token_latency_seconds",
            "Time between output tokens of a request as its client receives them: per step that gives the "
            "request tokens, the time since its previous ones, and 0 for each further token of that step "
            "(speculative decoding delivers them together); sum / count is the time per output token",
            buckets=_LATENCY, registry=r)
        self.step_itl = StepHistogram(self.itl)     # the engine thread observes here; after_step flushes
        self.step_seconds = Histogram(
            "dsv3_engine_step_seconds", "Wall time of one engine step (schedule, forward, sampling, detokenising), "
            "as the engine thread measures it; sum / count over a run against its length is how busy the engine was",
            buckets=_STEP, registry=r)
        self.phase_seconds = Counter(
            "dsv3_engine_phase_seconds", "Host seconds of the engine's steps by phase: schedule, prepare (build the "
            "batch), launch (enqueue forward and sampling), wait (the step's device->host read), post (detokenise, "
            "stops, draft)", ["phase"], registry=r)
        self._phases = {}                                    # phase -> (its counter, the seconds counted so far)
        self.e2e = Histogram("dsv3_request_latency_seconds", "Arrival to last output token", buckets=_LATENCY,
                             registry=r)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens) of recent steps
        self._recent_tokens = 0                              # their sum
        self._last_stats = (0, 0, 0, 0)
        self._blocks = [self.cache_blocks.labels(state) for state in ("used", "free_cached", "free_blank")]

    def after_step(self, engine, new_tokens: int) -> None:
        self.step_itl.flush()
        now = time.monotonic()
        recent = self._recent
        recent.append((now, new_tokens))
        self._recent_tokens += new_tokens
        while recent[0][0] < now - self._window_s:
            self._recent_tokens -= recent.popleft()[1]
        self.tokens_per_s.set(self._recent_tokens / self._window_s)
        st = engine.stats
        stats = (st.prefill_tokens, st.prefix_cached_tokens, st.generated_tokens, st.preemptions)
        for counter, new, old in zip((self.prompt_tokens, self.cached_tokens, self.generated, self.preemptions),
                                     stats, self._last_stats):
            if new > old:
                counter.inc(new - old)
        self._last_stats = stats
        for phase, total in st.phases.items():
            counter, seen = self._phases.get(phase) or (self.phase_seconds.labels(phase), 0.0)
            if total > seen:
                counter.inc(total - seen)
            self._phases[phase] = (counter, total)
        self.observe_queues(engine)

    def observe_queues(self, engine) -> None:
        alloc = engine.cache.allocator
        self.waiting.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.cache_usage.set(alloc.num_used / alloc.num_blocks)
        used, free_cached, free_blank = self._blocks
        used.set(alloc.num_used)
        free_cached.set(alloc.num_evictable)   # free, still holding a shared prefix
        free_blank.set(alloc.num_free - alloc.num_evictable)

    def render(self) -> bytes:
        return generate_latest(self.registry)
