"""The engine in a process of its own: the HTTP process tokenizes, renders templates, detokenized
text streams back, and the model steps without sharing an interpreter (and its GIL) with uvicorn.

    HTTP process                                    engine process
    EngineProcess.submit/abort ── PUSH ─ commands ─> PULL ─> EngineWorker (the same loop as in-thread)
    receiver thread  <─ PULL ─ events, one message per step ── PUSH <── its handles' deliver()

Messages are msgpack (msgspec): plain lists, strings, numbers and the SamplingParams dataclass;
nothing is pickled. The engine process is spawned with what builds the model (a picklable
function and its arguments, ours), warms up, and reports the engine's limits before the port opens.
A client that goes away aborts its sequence in the engine. If the engine process dies, every open
request gets a 503, /health answers 503 and the server is told to exit (non-zero). On SIGTERM the
HTTP side drains its streams, then sends "stop": the engine finishes what it holds and exits. The
engine process ignores SIGINT/SIGTERM (the HTTP process leads the shutdown) and exits on its own if
the HTTP process disappears. Under torchrun the engine stays on a thread of rank 0 (EngineWorker),
which leads the other ranks as before.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

from dsv3.core.errors import Dsv3Error
from dsv3.core.sampling import SamplingParams
from dsv3.serve.worker import Accepted, Delta, EngineWorker, Failed, Handle, busy_for

log = logging.getLogger("dsv3.serve")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_decode_params = msgspec.msgpack.Decoder(SamplingParams).decode
POLL_MS = 200


def _event_to_wire(event) -> list:
    if isinstance(event, Delta):
        return ["delta", event.text, event.num_tokens, event.finish_reason, event.prompt_tokens,
                event.completion_tokens, event.cached_tokens, event.logprobs, event.prompt_logprobs]
    if isinstance(event, Failed):
        return ["failed", event.status, event.message, event.type, event.code]
    return ["accepted"]


def _event_from_wire(msg: list):
    kind = msg[0]
    if kind == "delta":
        return Delta(*msg[1:])
    if kind == "failed":
        return Failed(*msg[1:])
    return Accepted()


class _Metrics:
    """The HTTP side's view of the engine's Prometheus metrics: errors it answers are counted in
    the engine process (one registry), whose text /metrics fetches."""

    def __init__(self, client: "EngineProcess"):
        self._client = client

    class _Counter:
        def __init__(self, client, status):
            self._client, self._status = client, status

        def inc(self) -> None:
            self._client._send(["http_error", self._status])

    class _Family:
        def __init__(self, client):
            self._client = client

        def labels(self, status: str):
            return _Metrics._Counter(self._client, status)

    @property
    def http_errors(self):
        return _Metrics._Family(self._client)


class EngineProcess:
    """The EngineWorker interface (start, alive, busy_for, submit, abort, stop, metrics) over an
    engine in its own process. `build(*build_args)` runs there and returns a dsv3.LLM."""

    def __init__(self, build, build_args: tuple = (), warm_up: bool = True):
        self._dir = tempfile.mkdtemp(prefix="dsv3-engine-")
        self._cmd_addr, self._evt_addr = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events"
        ctx = mp.get_context("spawn")        # no fork of a process holding threads and a CUDA context
        self._step_started = ctx.Value("d", 0.0, lock=False)   # written by the engine, read by /health
        self._proc = ctx.Process(target=_engine_main, name="dsv3-engine", daemon=True,
                                 args=(build, build_args, warm_up, self._cmd_addr, self._evt_addr,
                                       self._step_started, os.getpid()))
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PUSH)
        self._commands.bind(self._cmd_addr)
        self._events = self._zmq.socket(zmq.PULL)
        self._events.bind(self._evt_addr)
        self._send_lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._ids = iter(range(1, 2**62))
        self._metrics_waiters: dict[int, asyncio.Future] = {}
        self._stopping = self._dead = False
        self.exit_message: str | None = None     # set when the engine process died on its own
        self.on_exit = None                       # called (from the receiver thread) when it did
        self.metrics = _Metrics(self)
        self.info: dict = {}
        self._receiver = threading.Thread(target=self._receive, name="dsv3-engine-events", daemon=True)

    # -- start-up -----------------------------------------------------------------------------------
    def launch(self, timeout: float | None = None) -> dict:
        """Start the engine process and wait until it has built (and warmed up) the model; returns
        what it reports: the engine's limits, backend, warm-up time. Raises RuntimeError with the
        engine's own error message if it fails to start."""
        self._proc.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._events.poll(POLL_MS):
                msg = _decode(self._events.recv())
                if msg[0] == "ready":
                    self.info = msg[1]
                    return self.info
                if msg[0] == "error":
                    self._proc.join(10)
                    raise RuntimeError(msg[1])
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code {self._proc.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process did not start within {timeout:g} s")

    def start(self) -> None:
        self._receiver.start()

    # -- the EngineWorker interface -----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not (self._stopping or self._dead) and self._proc.is_alive()

    def busy_for(self) -> float:
        return busy_for(self._step_started)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        return self.submit_choices(prompt_ids, [params])[0]

    def submit_choices(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[Handle]:
        """One handle per choice of one prompt (n > 1: the engine computes the prompt once)."""
        loop = asyncio.get_running_loop()
        handles = []
        for p in params:
            h = Handle(prompt_ids, p, loop)
            h.seq, h.rid = None, next(self._ids)
            self._handles[h.rid] = h
            handles.append(h)
        if self._dead:
            for h in handles:
                h.events.put_nowait(Failed(503, self.exit_message or "the engine has stopped", "server_error"))
        else:
            self._send(["add", [h.rid for h in handles], list(prompt_ids), list(params)])
        return handles

    def abort(self, h: Handle) -> None:
        if not h.done and self._handles.pop(h.rid, None) is not None:
            self._send(["abort", h.rid])

    def stop(self, timeout: float | None = None) -> None:
        """Let the engine finish what it holds, then end it (and, past `timeout`, kill it)."""
        self._stopping = True
        if self._proc.is_alive():
            self._send(["stop"])
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.warning("the engine process did not stop within %s s; killing it", timeout)
                self._proc.kill()
                self._proc.join(5)
        self._close()

    async def render_metrics(self) -> bytes:
        if not self.alive:
            return b""
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._metrics_waiters[rid] = fut
        self._send(["metrics", rid])
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            self._metrics_waiters.pop(rid, None)

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, msg: list) -> None:
        with self._send_lock:
            if not self._commands.closed:
                self._commands.send(_encode(msg))

    def _receive(self) -> None:
        """Receiver thread: events of each engine step to their handles' event loops, in one wake-up."""
        while not self._events.closed:
            try:
                ready = self._events.poll(POLL_MS)
            except zmq.ZMQError:
                return
            if ready:
                msg = _decode(self._events.recv())
                if msg[0] == "events":
                    self._dispatch(msg[1])
                elif msg[0] == "metrics":
                    fut = self._metrics_waiters.get(msg[1])
                    if fut is not None:
                        fut.get_loop().call_soon_threadsafe(lambda f=fut, b=msg[2]: f.done() or f.set_result(b))
            elif not self._proc.is_alive():
                if not self._stopping:
                    self._engine_died()
                return

    def _dispatch(self, wire: list) -> None:
        pairs = []
        for rid, ev in wire:
            h = self._handles.get(rid)
            if h is None:
                continue
            event = _event_from_wire(ev)
            if isinstance(event, Failed) or (isinstance(event, Delta) and event.finish_reason is not None):
                del self._handles[rid]
            pairs.append((h, event))
        if pairs:
            pairs[0][0].deliver(pairs)

    def _engine_died(self) -> None:
        self._dead = True
        self.exit_message = (f"the engine process exited unexpectedly (exit code {self._proc.exitcode}); "
                             f"the server is stopping, retry on another instance")
        log.error(self.exit_message)
        failed = [(h, Failed(503, self.exit_message, "server_error")) for h in list(self._handles.values())]
        self._handles.clear()
        if failed:
            failed[0][0].deliver(failed)
        if self.on_exit is not None:
            self.on_exit()

    def _close(self) -> None:
        with self._send_lock:
            self._commands.close(linger=0)
        self._events.close(linger=0)
        self._zmq.term()
        for name in ("commands", "events"):
            Path(self._dir, name).unlink(missing_ok=True)
        os.rmdir(self._dir) if not os.listdir(self._dir) else None


# -- the engine process -----------------------------------------------------------------------------
def _engine_main(build, build_args, warm_up, cmd_addr, evt_addr, step_started, parent_pid) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):      # the HTTP process leads the shutdown
        signal.signal(sig, signal.SIG_IGN)
    ctx = zmq.Context()
    commands, events = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    commands.connect(cmd_addr)
    events.connect(evt_addr)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            events.send(_encode(msg))

    try:
        llm = build(*build_args)
        began = time.perf_counter()
        steps = llm.engine.warm_up() if warm_up else 0
        engine = llm.engine
        send(["ready", {"path": str(llm.path), "vocab_size": llm.config.vocab_size,
                        "max_context": engine.max_context, "capacity_tokens": engine.capacity_tokens,
                        "reserve": engine.reserve, "backend": llm.spec.name,
                        "warm_up_s": time.perf_counter() - began, "warm_up_steps": steps}])
    except BaseException as e:  # noqa: BLE001 - reported to the HTTP process, which prints it
        send(["error", str(e) if isinstance(e, Dsv3Error) else f"{type(e).__name__}: {e}"])
        time.sleep(0.2)
        os._exit(2)

    worker = EngineWorker(engine, step_clock=step_started)   # its step clock is shared with /health

    def deliver(pairs) -> None:              # one message per engine step
        for h, ev in pairs:
            if isinstance(ev, Failed) or (isinstance(ev, Delta) and ev.finish_reason is not None):
                handles.pop(h.rid, None)
        send(["events", [[h.rid, _event_to_wire(ev)] for h, ev in pairs]])

    handles: dict[int, Handle] = {}
    worker.start()
    while worker._thread.is_alive():
        if not commands.poll(POLL_MS):
            if os.getppid() != parent_pid:      # the HTTP process is gone: nobody to answer
                os._exit(1)
            continue
        msg = _decode(commands.recv())
        kind = msg[0]
        if kind == "add":          # one prompt's choices
            group = []
            for rid, p in zip(msg[1], msg[3]):
                h = Handle(msg[2], _decode_params(_encode(p)), None)
                h.rid, h.deliver = rid, deliver
                handles[h.rid] = h
                group.append(h)
            worker.put(("add", group))
        elif kind == "abort":
            h = handles.pop(msg[1], None)
            if h is not None:
                worker.put(("abort", h))
        elif kind == "http_error":
            worker.metrics.http_errors.labels(msg[1]).inc()
        elif kind == "metrics":
            send(["metrics", msg[1], worker.metrics.render()])
        elif kind == "stop":
            worker.put(("stop", None))
            worker._thread.join()
            break
    commands.close(linger=0)
    events.close(linger=1000)
    ctx.term()
