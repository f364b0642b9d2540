"""The engine thread: one thread owns the Engine and steps it while there is work.

HTTP handlers never touch the engine. They put commands (add, abort) on a thread-safe queue; the
engine thread applies them between steps and sends each request's events back to the event loop
with `loop.call_soon_threadsafe`, into an asyncio.Queue per request. So a model step never runs on
the event loop, and the engine's data structures are only ever touched by one thread.

Tensor/expert parallelism (torchrun): every rank holds a slice of the model and must run the same
steps. Rank 0 serves HTTP; before each step it broadcasts the commands it applied (adds with their
resolved seeds, aborts, stop), and the other ranks (`follow`) apply the same ones to their own
engine and step with it, so the schedules stay identical. While idle, rank 0 broadcasts an empty
list every few seconds so the other ranks' collectives never reach the distributed timeout.

Data-parallel attention (parallel.dp > 1): the groups hold different sequences, so rank 0 routes each
request to one group (DataParallelWorker), the other groups' first ranks add them (`follow_group`), every
rank steps while any group has work, and the other groups' progress comes back to rank 0 after each step.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

from dsv3.core.engine import Engine, QueueFullError
from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams
from dsv3.serve.metrics import Metrics

log = logging.getLogger("dsv3.serve")
HEARTBEAT_S = 5.0      # idle rank 0 broadcasts this often (well under DSV3_DIST_TIMEOUT)


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
    logprobs: list | None = None    # a [token, logprob, top ids, top logprobs] per new token, when asked for
    prompt_logprobs: list | None = None   # on the first delta with tokens, when asked for (echo)


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None


def refusal(e: QueueFullError | RequestError) -> Failed:
    """The answer to a request the engine would not add: 503 when its queue is full, else 400."""
    if isinstance(e, QueueFullError):
        return Failed(503, f"the server is overloaded: {e}", "server_error", "overloaded")
    return Failed(400, str(e))


class Handle:
    """One request as the event loop sees it: an event queue the engine thread fills."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.deliver = _deliver_to_loops    # how the engine thread hands this handle's events over
        self.arrival = time.monotonic()
        self.done = False               # set on the event loop once a final event was read
        # engine-thread side
        self.seq = None
        self.aborted = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.sent_prompt_logprobs = False
        self.request_id: int | None = None   # a data-parallel server's id for it (DataParallelWorker)

    def _send(self, event) -> None:
        self.deliver([(self, event)])


def _put_all(pairs) -> None:
    for h, event in pairs:
        h.events.put_nowait(event)


def _deliver_to_loops(pairs: list) -> None:
    """Hand events to their event loops, one wake-up per loop (one call per step, not per request)."""
    by_loop: dict = {}
    for h, event in pairs:
        by_loop.setdefault(h.loop, []).append((h, event))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, group)
        except RuntimeError:            # the event loop is closed: nobody is listening any more
            pass


class StepClock:
    """When the engine step now running began (time.time(); 0.0 between steps), for /health. The engine
    process passes a multiprocessing Value instead: same `.value`, shared with the HTTP process."""
    value: float = 0.0


def busy_for(clock) -> float:
    """Seconds the step on `clock` (a StepClock or a shared Value) has been running; 0 between steps."""
    started = clock.value
    return 0.0 if started == 0.0 else time.time() - started


class EngineWorker:
    def __init__(self, engine: Engine, metrics: Metrics | None = None, mesh=None, step_clock=None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.mesh = mesh if mesh is not None and mesh.world > 1 else None
        # Alone, a step that raises is retried per sequence and only the guilty request fails. Ranks of
        # a parallel engine must run identical steps, so there a failed step stops serving instead.
        engine.isolate_failures = self.mesh is None
        self.step_clock = step_clock if step_clock is not None else StepClock()
        self._replay: list[tuple] = []               # commands applied since the last broadcast
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

    def busy_for(self) -> float:
        """Seconds the engine has spent in the step now running (0 when between steps)."""
        return busy_for(self.step_clock)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        return self.submit_choices(prompt_ids, [params])[0]

    def submit_choices(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[Handle]:
        """One handle per choice of one prompt (n > 1: Engine.add_choices computes the prompt once)."""
        loop = asyncio.get_running_loop()
        handles = [Handle(prompt_ids, p, loop) for p in params]
        self._commands.put(("add", handles))
        return handles

    def put(self, command: tuple) -> None:
        """Queue a command ("add", handle) / ("abort", handle) / ("stop", None) from any thread."""
        self._commands.put(command)

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

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
        while True:
            try:
                self._loop()
                return
            except Exception as e:  # noqa: BLE001 - a bug outside any one request's step
                if self.mesh is not None:     # a collective failed or a step raised: the ranks may differ
                    log.exception("the engine thread stopped")
                    self._stopping = True                      # /health answers 503 from now on
                    self._fail_all(f"the engine stopped ({type(e).__name__}: {e}); the server must be restarted")
                    return
                log.exception("engine loop error; failing the %d requests in flight and serving on",
                              len(self._active))
                self._fail_all(f"internal error in the engine ({type(e).__name__}: {e}); the request was "
                               f"dropped, retry it")
                for seq in list(self.engine.running) + list(self.engine.waiting):
                    self.engine.release(seq)

    def _loop(self) -> None:
        eng = self.engine
        while not (self._stopping and not eng.has_work()):
            # Block for commands only when idle (waking for the heartbeat when parallel); between
            # steps, take whatever has arrived.
            self._apply_commands(wait=not eng.has_work(), timeout=HEARTBEAT_S if self.mesh else None)
            if self.mesh is not None:
                replay, self._replay = self._replay, []
                broadcast(self.mesh, replay)
            if eng.has_work():
                self._step()
            else:
                self.metrics.observe_queues(eng)

    def _apply_commands(self, wait: bool, timeout: float | None = None) -> None:
        """Apply the commands queued by now; with `wait`, first wait for one up to `timeout` seconds
        (None: for ever)."""
        try:
            command = self._commands.get(timeout=timeout) if wait else self._commands.get_nowait()
            self._apply(command)
            while True:
                self._apply(self._commands.get_nowait())
        except queue.Empty:
            pass

    def _fail_all(self, message: str) -> None:
        for h in list(self._active.values()):
            if h.seq is not None and not h.seq.finished:   # None: another data-parallel group runs it
                self.engine.release(h.seq)
            h._send(Failed(500, message, "server_error"))
            self.metrics.requests.labels("error").inc()
        self._active.clear()

    def _apply(self, command) -> None:
        kind, h = command
        if kind == "stop":
            self._stopping = True
            self._replay.append(("stop",))
        elif kind == "add":          # h: the handles of one prompt's choices
            handles = [x for x in h if not x.aborted]
            if not handles:
                return
            self._draw_seeds(handles)
            failed = None
            try:
                prompt = handles[0].prompt_ids
                seqs = ([self.engine.add(prompt, handles[0].params)] if len(handles) == 1
                        else self.engine.add_choices(prompt, [x.params for x in handles]))
            except (QueueFullError, RequestError) as e:
                failed = refusal(e)
            except Exception as e:  # noqa: BLE001 - this request alone is refused; the engine goes on
                log.exception("engine.add failed")
                failed = Failed(500, f"internal error admitting the request ({type(e).__name__}: {e})", "server_error")
            if failed is not None:
                for x in handles:
                    x._send(failed)
                return
            for x, seq in zip(handles, seqs):
                x.seq = seq
                self._active[seq.id] = x
            self._replay.append(("add", [s.id for s in seqs], handles[0].prompt_ids, [x.params for x in handles]))
            for x in handles:
                x._send(Accepted())     # refusals above are counted once, by the HTTP layer
        elif kind == "abort":
            h.aborted = True
            if h.seq is not None and not h.seq.finished and self._active.pop(h.seq.id, None) is not None:
                self.engine.release(h.seq)
                self._replay.append(("abort", h.seq.id))
                self.metrics.requests.labels("aborted").inc()

    def _draw_seeds(self, handles: list[Handle]) -> None:
        """Parallel: every rank (or a data-parallel group's ranks) must sample alike, so an unseeded
        sampled request gets its seed drawn here and sent with it."""
        for x in handles:
            if self.mesh is not None and not x.params.greedy and x.params.seed is None:
                x.params = dataclasses.replace(x.params, seed=secrets.randbits(62))

    @contextlib.contextmanager
    def _clocked(self):
        """A step under the step clock (/health) and, when it returns, into the step-time histogram."""
        self.step_clock.value = began = time.time()
        try:
            yield
        finally:
            self.step_clock.value = 0.0
        self.metrics.step_seconds.observe(time.time() - began)

    def _step(self) -> None:
        with self._clocked():
            # Alone, a failing sequence comes back as an output with .error (Engine.isolate_failures);
            # what still raises is a bug outside any one sequence, which _run handles.
            outputs = self.engine.step()
        self._deliver([(out.seq.id, Progress.of(out)) for out in outputs])

    def _deliver(self, progress: list[tuple[int, "Progress"]]) -> None:
        """Turn one step's progress (request key -> Progress) into the handles' events, sent once."""
        now = time.monotonic()
        itl = self.metrics.step_itl             # flushed into the histogram by after_step
        new_tokens, sends = 0, []             # [(handle, event)], handed over once per step
        for key, out in progress:
            h = self._active.get(key)
            if h is None:
                continue
            n = len(out.new_tokens)
            new_tokens += n
            if n:
                if h.first_token_at is None:
                    h.first_token_at = now
                    self.metrics.ttft.observe(now - h.arrival)
                elif h.last_token_at is not None:
                    itl.observe(now - h.last_token_at)
                    if n > 1:                   # several tokens at once after speculative verification
                        itl.observe(0.0, n - 1)     # arrive with the first: no gap
                h.last_token_at = now
            if out.error is not None:
                del self._active[key]
                self._finished(h)
                self.metrics.requests.labels("error").inc()
                sends.append((h, Failed(
                    500, f"internal error while generating this request ({out.error}); it was dropped, the "
                         f"server serves on", "server_error")))
                continue
            logprobs = ([[t, *e] for t, e in zip(out.new_tokens, out.new_logprobs)]
                        if h.params.logprobs is not None else None)    # [token, logprob, top ids, top logprobs]
            prompt_logprobs = out.prompt_logprobs if h.params.prompt_logprobs is not None else None
            if h.sent_prompt_logprobs:
                prompt_logprobs = None
            if out.finished:
                del self._active[key]
                self.metrics.requests.labels(out.finish_reason).inc()
                self.metrics.e2e.observe(now - h.arrival)
                self._finished(h)
                ev = Delta(out.delta, n, out.finish_reason, out.prompt_tokens, out.completion_tokens,
                           out.cached_tokens, logprobs, prompt_logprobs)
            elif out.delta or n:
                ev = Delta(out.delta, n, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            else:
                continue
            h.sent_prompt_logprobs = True       # on the request's first event only
            sends.append((h, ev))
        if sends:
            sends[0][0].deliver(sends)       # every handle of one worker delivers the same way
        self.metrics.after_step(self.engine, new_tokens)

    def _finished(self, h: Handle) -> None:
        """A request ended (hook for the data-parallel worker's load accounting)."""


@dataclass
class Progress:
    """What one step did to one sequence, as the handles need it: built from a StepOutput here, or
    from the JSON a data-parallel group sends rank 0 (`wire` / `from_wire`)."""
    delta: str
    new_tokens: list[int]
    new_logprobs: list
    finished: bool
    error: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_logprobs: list | None

    @classmethod
    def of(cls, out) -> "Progress":
        s = out.seq
        return cls(out.delta, out.new_tokens, out.new_logprobs, out.finished, out.error, s.finish_reason,
                   s.prompt_len, s.num_output, s.num_prefix_cached,
                   s.prompt_logprobs if s.params.prompt_logprobs is not None else None)

    def wire(self) -> list:
        return [self.delta, self.new_tokens, self.new_logprobs, self.finished, self.error, self.finish_reason,
                self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.prompt_logprobs]

    @classmethod
    def from_wire(cls, v: list) -> "Progress":
        p = cls(*v)
        p.new_logprobs = [tuple(e) for e in p.new_logprobs]
        if p.prompt_logprobs is not None:
            p.prompt_logprobs = [None if e is None else tuple(e) for e in p.prompt_logprobs]
        return p


def broadcast(mesh, replay: list | None) -> list:
    """Rank 0 sends `replay`; every other rank returns what rank 0 sent."""
    import torch.distributed as dist
    box = [replay]
    mesh.comm.call("broadcast of the serving commands", dist.broadcast_object_list, box, 0, group=mesh.comm.world_group)
    return box[0]


def follow(engine: Engine, mesh) -> None:
    """Ranks > 0 of a parallel server: apply rank 0's commands and step in lockstep until it stops."""
    seqs, stopping = {}, False          # rank 0's sequence id -> this rank's sequence
    while True:
        for entry in broadcast(mesh, None):
            if entry[0] == "add":
                for rank0_id, seq in zip(entry[1], engine.add_choices(entry[2], entry[3])):
                    seqs[rank0_id] = seq
            elif entry[0] == "abort":
                s = seqs.pop(entry[1], None)
                if s is not None and not s.finished:
                    engine.release(s)
            elif entry[0] == "stop":
                stopping = True
        if engine.has_work():
            engine.step()
            seqs = {k: s for k, s in seqs.items() if not s.finished}
        elif stopping:
            return


class DataParallelWorker(EngineWorker):
    """Rank 0 of a server with data-parallel attention (parallel.dp > 1): each request goes to one group
    (the one with the fewest cache blocks assigned, its prompt plus max_tokens per choice), which alone
    adds and runs it; rank 0 runs group 0's engine itself. Every rank steps in lockstep while any group
    has work (Engine.step is a collective there), and after each step the other groups send rank 0 their
    sequences' progress (`Progress.wire`, JSON over all_gather), which becomes the handles' events as for
    group 0's own. Requests are keyed by a server-wide id, since sequence ids are per engine."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None, mesh=None, step_clock=None):
        super().__init__(engine, metrics, mesh, step_clock)
        self._next_id = 0
        self._load = [0] * mesh.dp               # cache blocks assigned per group
        self._placed: dict[int, tuple[int, int]] = {}   # request id -> (group, blocks)
        self._local: dict[int, int] = {}         # group 0's sequence id -> request id

    def _loop(self) -> None:
        eng = self.engine
        while True:
            busy = eng.has_work() or bool(self._placed) or self._stopping
            self._apply_commands(wait=not busy, timeout=HEARTBEAT_S)
            replay, self._replay = self._replay, []
            broadcast(self.mesh, replay)
            if eng.world_has_work():
                self._step()
            else:
                self.metrics.observe_queues(eng)
                if self._stopping:
                    return

    def _apply(self, command) -> None:
        kind, h = command
        if kind != "add":
            if kind == "abort":
                self._abort(h)
            else:
                super()._apply(command)
            return
        handles = [x for x in h if not x.aborted]
        if not handles:
            return
        self._draw_seeds(handles)
        prompt, params = handles[0].prompt_ids, [x.params for x in handles]
        eng = self.engine
        group = min(range(len(self._load)), key=lambda g: self._load[g])
        ids = list(range(self._next_id, self._next_id + len(handles)))
        try:
            if group == 0:
                for x, s, i in zip(handles, eng.add_choices(prompt, params), ids):
                    x.seq, self._local[s.id] = s, i
            else:
                eng.check_request(prompt, params)        # the other groups' limits are the same
        except (QueueFullError, RequestError) as e:
            for x in handles:
                x._send(refusal(e))
            return
        self._next_id += len(handles)
        for x, i in zip(handles, ids):
            blocks = eng.cache.blocks_needed(min(len(prompt) + x.params.max_new_tokens, eng.max_context))
            x.request_id = i
            self._active[i] = x
            self._placed[i] = (group, blocks)
            self._load[group] += blocks
            x._send(Accepted())
        self.metrics.placed.labels(str(group)).inc(len(handles))
        self._replay.append(("add", group, ids, prompt, params))

    def _abort(self, h: Handle) -> None:
        h.aborted = True
        i = h.request_id
        if i is None or self._active.pop(i, None) is None:
            return
        group, _ = self._placed[i]
        self._finished(h)
        if h.seq is not None and not h.seq.finished:     # group 0's own
            self.engine.release(h.seq)
        self._replay.append(("abort", group, i))
        self.metrics.requests.labels("aborted").inc()

    def _finished(self, h: Handle) -> None:
        group, blocks = self._placed.pop(h.request_id)
        self._load[group] -= blocks

    def _step(self) -> None:
        with self._clocked():
            outputs = self.engine.step()
            reports = self.mesh.comm.gather_json({})      # every other group's progress this step
        progress = [(self._local.get(out.seq.id, -1), Progress.of(out)) for out in outputs]
        for out in outputs:
            if out.finished:
                self._local.pop(out.seq.id, None)
        for report in reports:
            for i, why in report.get("refused", []):
                h = self._active.pop(i, None)
                if h is not None:
                    self._finished(h)
                    h._send(Failed(*why))
            progress += [(i, Progress.from_wire(v)) for i, v in report.get("progress", [])]
        self._deliver(progress)


def follow_group(engine: Engine, mesh) -> None:
    """Ranks > 0 of a data-parallel server: add the requests rank 0 sends this rank's group, step in
    lockstep with every rank while any has work, and (the group's first rank) send rank 0 the
    progress of the group's sequences after each step."""
    seqs: dict[int, int] = {}                  # sequence id -> request id
    by_request: dict[int, object] = {}
    refused, stopping = [], False
    report = mesh.tp_rank == 0
    while True:
        for entry in broadcast(mesh, None):
            if entry[0] == "add" and entry[1] == mesh.dp_rank:
                try:
                    for i, s in zip(entry[2], engine.add_choices(entry[3], entry[4])):
                        seqs[s.id], by_request[i] = i, s
                except (QueueFullError, RequestError) as e:
                    refused += [[i, list(dataclasses.astuple(refusal(e)))] for i in entry[2]]
            elif entry[0] == "abort" and entry[1] == mesh.dp_rank:
                s = by_request.pop(entry[2], None)
                if s is not None and not s.finished:
                    engine.release(s)
            elif entry[0] == "stop":
                stopping = True
        if mesh.comm.any_rank(engine.has_work() or bool(refused)):
            outputs = engine.step()
            progress = [[seqs[o.seq.id], Progress.of(o).wire()] for o in outputs if o.seq.id in seqs]
            mesh.comm.gather_json({"progress": progress, "refused": refused} if report else {})
            refused = []
            for o in outputs:
                if o.finished:
                    by_request.pop(seqs.pop(o.seq.id, -1), None)
        elif stopping:
            return
