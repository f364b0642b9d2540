"""The engine thread: one thread owns the Engine and steps it while there is work.

HTTP handlers never touch the engine. They put commands (add, abort) on a thread-safe queue; the
engine thread applies them between steps and sends each request's events back to the event loop
with `loop.call_soon_threadsafe`, into an asyncio.Queue per request. So a model step never runs on
the event loop, and the engine's data structures are only ever touched by one thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from dsv3.core.engine import Engine, QueueFullError
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams
from dsv3.serve.metrics import Metrics

log = logging.getLogger("dsv3.serve")


@dataclass(frozen=True)
class Accepted:
    """The engine queued the request."""


@dataclass(frozen=True)
class Delta:
    text: str
    num_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0          # the usage fields are filled on the final delta
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None


class Handle:
    """One request as the event loop sees it: an event queue the engine thread fills."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.done = False               # set on the event loop once a final event was read
        # engine-thread side
        self.seq = None
        self.aborted = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def _send(self, event) -> None:
        _deliver(self.loop, [(self, event)])


def _put_all(pairs) -> None:
    for h, event in pairs:
        h.events.put_nowait(event)


def _deliver(loop: asyncio.AbstractEventLoop, pairs: list) -> None:
    """Hand events to the event loop in one wake-up (one call per step, not one per request)."""
    try:
        loop.call_soon_threadsafe(_put_all, pairs)
    except RuntimeError:                # the event loop is closed: nobody is listening any more
        pass


class EngineWorker:
    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, Handle] = {}          # sequence id -> handle
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)

    # -- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        h = Handle(prompt_ids, params, asyncio.get_running_loop())
        self._commands.put(("add", h))
        return h

    def abort(self, h: Handle) -> None:
        """Drop a request whose client went away; its blocks are freed before the next step."""
        if not h.done:
            self._commands.put(("abort", h))

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests still in the engine, then end the thread."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            # Block for commands only when idle; between steps, take whatever has arrived.
            self._apply(self._commands.get())
            while True:
                try:
                    self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            while eng.has_work():
                self._step()
                while True:
                    try:
                        self._apply(self._commands.get_nowait())
                    except queue.Empty:
                        break
            self.metrics.observe_queues(eng)
            if self._stopping:
                return

    def _apply(self, command) -> None:
        kind, h = command
        if kind == "stop":
            self._stopping = True
        elif kind == "add":
            if h.aborted:
                return
            try:
                h.seq = self.engine.add(h.prompt_ids, h.params)
            except QueueFullError as e:
                self.metrics.http_errors.labels("503").inc()
                h._send(Failed(503, f"the server is overloaded: {e}", "server_error", "overloaded"))
                return
            except RequestError as e:
                self.metrics.http_errors.labels("400").inc()
                h._send(Failed(400, str(e)))
                return
            self._active[h.seq.id] = h
            h._send(Accepted())
        elif kind == "abort":
            h.aborted = True
            if h.seq is not None and not h.seq.finished and self._active.pop(h.seq.id, None) is not None:
                self.engine.release(h.seq)
                self.metrics.requests.labels("aborted").inc()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a bug in a step must not take the server down
            log.exception("engine step failed; dropping the %d requests in flight", len(self._active))
            for h in list(self._active.values()):
                self.engine.release(h.seq)
                h._send(Failed(500, f"internal error in the engine step ({type(e).__name__}: {e}); "
                                    f"the request was dropped, retry it", "server_error"))
                self.metrics.requests.labels("error").inc()
            self._active.clear()
            return
        now = time.monotonic()
        new_tokens, sends = 0, {}             # event loop -> [(handle, event)]
        for out in outputs:
            h = self._active.get(out.seq.id)
            if h is None:
                continue
            n = len(out.new_tokens)
            new_tokens += n
            if n:
                if h.first_token_at is None:
                    h.first_token_at = now
                    self.metrics.ttft.observe(now - h.arrival)
                elif h.last_token_at is not None:
                    for _ in range(n):          # several tokens at once after speculative verification
                        self.metrics.itl.observe((now - h.last_token_at) / n)
                h.last_token_at = now
            s = out.seq
            if out.finished:
                del self._active[s.id]
                self.metrics.requests.labels(s.finish_reason).inc()
                self.metrics.e2e.observe(now - h.arrival)
                ev = Delta(out.delta, n, s.finish_reason, s.prompt_len, len(s.output_ids), s.num_prefix_cached)
            elif out.delta or n:
                ev = Delta(out.delta, n)
            else:
                continue
            sends.setdefault(h.loop, []).append((h, ev))
        for loop, pairs in sends.items():
            _deliver(loop, pairs)
        self.metrics.after_step(self.engine, new_tokens)
