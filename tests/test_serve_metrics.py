"""The engine thread's metrics: StepHistogram against prometheus_client's own observe, and what a
step that gives a request several tokens (speculative decoding) records as inter-token latency."""
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dsv3.core.engine import EngineStats, StepOutput
from dsv3.core.sampling import SamplingParams
from dsv3.core.scheduler import Sequence
from dsv3.serve import metrics as metrics_mod
from dsv3.serve.metrics import Metrics, StepHistogram
from dsv3.serve.worker import EngineWorker, Handle


def _histogram(values, batched: bool) -> bytes:
    r = CollectorRegistry()
    h = Histogram("x_seconds", "x", buckets=metrics_mod._LATENCY, registry=r)
    step = StepHistogram(h)
    for v, n in values:
        if batched:
            step.observe(v, n)
        else:
            for _ in range(n):
                h.observe(v)
    step.flush()
    return generate_latest(r).replace(b"_created", b"")


def test_step_histogram_renders_as_observe_does():
    values = [(0.0, 3), (0.001, 2), (0.0011, 1), (0.0165, 5), (60.0, 1), (61.0, 2)]   # bucket edges, +Inf
    batched = _histogram(values, True)
    assert batched.split(b"\n")[:-3] == _histogram(values, False).split(b"\n")[:-3]   # all but _created
    assert b'x_seconds_count 14.0' in batched


class _Engine:
    """Every running request gets `k` tokens per step; the clock moves `gap` seconds per step."""

    def __init__(self, k: int, clock: list[float], gap: float):
        self.k, self.clock, self.gap = k, clock, gap
        self.stats, self.running, self.waiting = EngineStats(), [], []
        self.cache = SimpleNamespace(allocator=SimpleNamespace(num_used=0, num_blocks=1, num_evictable=0, num_free=1))

    def has_work(self):
        return bool(self.running)

    def add(self, prompt, params):
        self.running.append(Sequence(list(prompt), len(prompt), params))
        return self.running[-1]

    def step(self):
        self.clock[0] += self.gap
        outputs = []
        for s in self.running:
            s.token_ids += [5] * self.k
            if len(s.token_ids) - s.prompt_len >= s.params.max_new_tokens:
                s.finish_reason = "length"
            outputs.append(StepOutput(s, "x" * self.k, s.finished, [5] * self.k))
        self.stats.generated_tokens += self.k * len(outputs)
        self.running = [s for s in self.running if not s.finished]
        return outputs


def test_k_token_step_records_its_gap_once_and_zeros_for_the_rest(monkeypatch):
    from dsv3.serve import worker as worker_mod
    clock = [100.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    k, gap, steps = 3, 0.02, 4
    eng = _Engine(k, clock, gap)
    w = EngineWorker(eng, Metrics())
    h = Handle([1, 2], SamplingParams(max_new_tokens=k * steps), None)
    h.deliver = lambda pairs: None
    w._apply(("add", [h]))
    for _ in range(steps):
        w._step()
    samples = {s.name + s.labels.get("le", ""): s.value
               for s in next(iter(w.metrics.itl.collect())).samples}
    # the first step's tokens are the time to first token; each later step: one gap and k - 1 zeros
    assert samples["dsv3_inter_token_latency_seconds_count"] == (steps - 1) * k
    assert abs(samples["dsv3_inter_token_latency_seconds_sum"] - (steps - 1) * gap) < 1e-9
    assert samples["dsv3_inter_token_latency_seconds_bucket0.001"] == (steps - 1) * (k - 1)
    assert samples["dsv3_inter_token_latency_seconds_bucket0.01"] == (steps - 1) * (k - 1)
    assert samples["dsv3_inter_token_latency_seconds_bucket0.025"] == (steps - 1) * k
    assert w.metrics.tokens_per_s.collect()[0].samples[0].value > 0
    steps_seen = {s.name: s.value for s in next(iter(w.metrics.step_seconds.collect())).samples}
    assert steps_seen["dsv3_engine_step_seconds_count"] == steps      # one observation per engine step


def test_tokens_per_second_counts_only_the_window(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: clock[0])
    m = Metrics(window_s=2.0)
    eng = _Engine(1, clock, 0.0)
    rate = lambda: m.tokens_per_s.collect()[0].samples[0].value  # noqa: E731
    for t, n in ((0.0, 10), (1.0, 6), (2.5, 4)):
        clock[0] = t
        m.after_step(eng, n)
    assert rate() == (6 + 4) / 2.0          # the step at 0.0 left the window at 2.5
    clock[0] = 10.0
    m.after_step(eng, 0)
    assert rate() == 0.0


def test_engine_phase_seconds_follow_the_engine_stats():
    m = Metrics()
    eng = _Engine(1, [0.0], 0.0)
    value = lambda phase: m.phase_seconds.labels(phase)._value.get()  # noqa: E731
    eng.stats.phases["wait"], eng.stats.phases["post"] = 0.5, 0.125
    m.after_step(eng, 1)
    eng.stats.phases["wait"] += 0.25
    m.after_step(eng, 1)
    assert value("wait") == 0.75 and value("post") == 0.125 and value("schedule") == 0.0
    assert b'dsv3_engine_phase_seconds_total{phase="wait"} 0.75' in m.render()
