"""The engine thread's two latency rules (dsv3/serve/worker.py): an idle engine gathers the requests that
arrive right behind the first before it steps, and a step's events are built and sent on a thread of
their own while the next step runs, in step order, all of them out before the worker stops."""
import threading
import time
from types import SimpleNamespace

from dsv3.core.engine import EngineStats, StepOutput
from dsv3.core.sampling import SamplingParams
from dsv3.core.scheduler import Sequence
from dsv3.serve import worker as worker_mod
from dsv3.serve.worker import Accepted, Delta, EngineWorker, Handle


class _Engine:
    """One token per running request per step; records how many requests each step ran."""

    def __init__(self, step_s: float = 0.0):
        self.step_s, self.batches = step_s, []
        self.stats, self.running, self.waiting = EngineStats(), [], []
        self.cache = SimpleNamespace(allocator=SimpleNamespace(num_used=0, num_blocks=1, num_evictable=0, num_free=1))

    def has_work(self):
        return bool(self.running)

    def add(self, prompt, params):
        self.running.append(Sequence(list(prompt), len(prompt), params))
        return self.running[-1]

    def release(self, seq):
        if seq in self.running:
            self.running.remove(seq)

    def step(self):
        time.sleep(self.step_s)
        self.batches.append(len(self.running))
        outputs = []
        for s in self.running:
            n = len(s.token_ids) - s.prompt_len
            s.token_ids.append(100 + n)
            if n + 1 >= s.params.max_new_tokens:
                s.finish_reason = "length"
            outputs.append(StepOutput(s, f"<{n}>", s.finished, [100 + n]))
        self.running = [s for s in self.running if not s.finished]
        return outputs


def _handle(tokens: int, events: dict):
    """A handle whose events (every handle's, as one worker delivers them together) land in events[handle]."""
    h = Handle([1, 2, 3], SamplingParams(max_new_tokens=tokens), None)
    h.deliver = lambda pairs: [events.setdefault(x, []).append(ev) for x, ev in pairs]
    return h


def test_an_idle_engine_takes_the_requests_right_behind_the_first_into_its_first_step(monkeypatch):
    monkeypatch.setattr(worker_mod, "GATHER_GAP_S", 0.2)     # wide windows: the timing below is 10x inside them
    monkeypatch.setattr(worker_mod, "GATHER_MAX_S", 1.0)
    eng = _Engine()
    w = EngineWorker(eng)
    events: dict = {}
    handles = [_handle(2, events) for _ in range(4)]

    def arrive():
        for h in handles[:3]:
            w.put(("add", [h]))
            time.sleep(0.02)
        time.sleep(1.5)                                      # past the window: the next step's
        w.put(("add", [handles[3]]))
    feeder = threading.Thread(target=arrive)
    feeder.start()
    w._apply_commands(wait=True)
    assert len(eng.running) == 3, "the three requests 20 ms apart should start together"
    feeder.join()
    w._apply_commands(wait=False)
    assert len(eng.running) == 4


def test_step_events_go_out_in_order_from_the_publisher_and_all_before_stop_returns():
    eng = _Engine(step_s=0.001)
    w = EngineWorker(eng)
    slow = w._deliver

    def deliver(progress):            # building and sending events slower than a step: they queue up
        time.sleep(0.01)
        slow(progress)
    w._deliver = deliver
    events: dict = {}
    handles = [_handle(tokens, events) for tokens in (5, 9, 1)]
    w.start()
    for h in handles:
        w.put(("add", [h]))
    w.stop(30)
    assert not w._thread.is_alive() and not w._publisher.is_alive()
    for i, (h, tokens) in enumerate(zip(handles, (5, 9, 1))):
        evs = events[h]
        assert isinstance(evs[0], Accepted)
        deltas = evs[1:]
        assert all(isinstance(d, Delta) for d in deltas)
        assert "".join(d.text for d in deltas) == "".join(f"<{n}>" for n in range(tokens)), i
        assert [d.finish_reason for d in deltas] == [None] * (tokens - 1) + ["length"]
        assert deltas[-1].completion_tokens == tokens
    assert max(eng.batches) == 3
