"""Run the app under uvicorn: in the foreground (`dsv3-run serve`) or in a thread (tests, benchmarks)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from dsv3.serve.app import ServeOptions, ServedModel, create_app
from dsv3.serve.worker import DataParallelWorker, EngineWorker


def http_protocol():
    """uvicorn's HTTP/1.1 protocol class: httptools' (the C parser of Node's llhttp) when installed, as
    uvicorn's own `auto` picks, else the pure-Python h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol


def _timed_http(header_timeout: float) -> type:
    """uvicorn's HTTP protocol (http_protocol), closing a connection whose request headers have not all
    arrived `header_timeout` s after it opened (or after its previous response): a client that opens
    sockets and trickles bytes would otherwise hold them for ever. Idle keep-alive connections are
    closed by uvicorn's own keep-alive timeout; slow bodies by the app (ServeOptions.body_timeout_s)."""

    class TimedProtocol(http_protocol()):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            armed_at = self.cycle                  # a new request replaces the cycle
            self.loop.call_later(header_timeout, self._header_timeout, armed_at)

        def _header_timeout(self, armed_at) -> None:
            if self.cycle is armed_at and not self.transport.is_closing():
                self.transport.close()

    return TimedProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(llm, options: ServeOptions, log_level: str = "info", drain_timeout: float = 60.0,
                worker=None, model: ServedModel | None = None):
    """(uvicorn.Server, worker) serving `llm` (a dsv3.LLM) on an engine thread of this process, or,
    given `worker` (an EngineProcess) and `model`, through an engine in its own process. The worker
    starts with the app's lifespan."""
    if worker is None:
        mesh = getattr(llm, "mesh", None)
        kind = DataParallelWorker if mesh is not None and mesh.data_parallel else EngineWorker
        worker, model = kind(llm.engine, mesh=mesh), ServedModel.of(llm)
    app = create_app(model, worker, options)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on", access_log=log_level == "debug",
                            http=_timed_http(options.header_timeout_s))
    server = uvicorn.Server(config)
    if hasattr(worker, "on_exit"):      # an engine process that dies stops the server (which drains)
        worker.on_exit = lambda: setattr(server, "should_exit", True)
    return server, worker


class ServerThread:
    """A server on 127.0.0.1 (a free port) in a background thread: `with ServerThread(llm, opts) as s:`
    then s.url. Leaving the block shuts it down the way SIGTERM does (drain, then stop)."""

    def __init__(self, llm, options: ServeOptions, log_level: str = "warning", start_timeout: float = 60.0,
                 worker=None, model: ServedModel | None = None):
        self.server, self.worker = make_server(llm, options, log_level, worker=worker, model=model)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="dsv3-http", daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start; see the log above")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(120)
        self.sock.close()
