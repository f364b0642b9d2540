"""`dsv3-run serve`: the OpenAI-compatible HTTP server (dsv3.serve)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from dsv3.commands.options import add_runtime_args, build_llm, cpu_threads, set_serving_threads
from dsv3.parallel.launch import world_size
from dsv3.core.errors import Dsv3Error

EXAMPLES = """examples:
  dsv3-run serve                                       # the demo model; OpenAI base URL http://127.0.0.1:8000/v1
  dsv3-run serve --model ~/DeepSeek-V3 --backend cuda --api-key "$KEY"
  torchrun --nproc-per-node 8 --no-python dsv3-run serve --model ~/DeepSeek-V3 --backend cuda   # rank 0 serves
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
"""


def _port(text: str) -> int:
    import argparse
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port: use 1-65535, or 0 for a free one")
    return port


def register(subparsers) -> None:
    import argparse
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health "
                                          "and /metrics with continuous batching over the paged latent cache.")
    add_runtime_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, use --api-key)")
    g.add_argument("--port", type=_port, default=8000, help="port (0 picks a free one; the URL is printed)")
    g.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $DSV3_API_KEY)")
    g.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's folder name)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued for the cache before new ones get 503 (default 256)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (default 4 MiB)")
    g.add_argument("--max-prompt-tokens", type=int, help="prompt length limit (default: context and cache)")
    g.add_argument("--max-batch-tokens", type=int, help="tokens per engine step (chunked-prefill budget)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt blocks between requests")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip the start-up warm-up (throwaway requests that compile kernels and capture CUDA graphs "
                        "for each batch size before the port opens, instead of during the first clients' requests)")
    g.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM/Ctrl-C, seconds to let running requests finish (default 60)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="close a connection whose request headers take longer than this (s, default 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="answer 408 when a request body takes longer than this to arrive (s, default 30)")
    g.add_argument("--stuck-timeout", type=float, default=120.0,
                   help="/health answers 503 'stuck' while one engine step has run longer than this (s, default 120)")
    g.add_argument("--engine-thread", action="store_true",
                   help="run the engine on a thread of the HTTP process instead of a process of its own "
                        "(always so under torchrun)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import msgspec  # noqa: F401 - the engine process's wire format
        import zmq  # noqa: F401 - and its sockets
        from dsv3.serve.server import bind, make_server
    except ImportError as e:
        raise Dsv3Error(f"dsv3-run serve needs the serve extra ({e.name} is missing): "
                        f"pip install 'dsv3[serve]'") from e
    for name in ("max_waiting", "max_body_bytes", "max_prompt_tokens", "max_batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise Dsv3Error(f"--{name.replace('_', '-')} must be >= 1")
    # bind first: a port in use is reported before minutes of loading and warm-up, not after
    try:
        sock = bind(args.host, args.port) if world_size() == 1 or os.environ.get("RANK") in (None, "0") else None
    except OSError as e:
        raise Dsv3Error(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from e
    if world_size() > 1 or args.engine_thread:
        server, model = _serve_in_thread(args, build_serving_llm(args))
        if server is None:                    # a rank > 0 of a parallel server: it followed rank 0
            return 0
        engine_process = None
    else:
        from dsv3.core.tokenizer import Tokenizer
        from dsv3.serve.app import ServedModel
        from dsv3.serve.engine_process import EngineProcess
        engine_process = EngineProcess(build_serving_llm, (args,), warm_up=not args.no_warmup)
        try:
            info = engine_process.launch()
        except RuntimeError as e:
            raise Dsv3Error(str(e)) from None
        if not args.no_warmup:
            print(f"dsv3 serve: warmed up in {info['warm_up_s']:.1f} s ({info['warm_up_steps']} steps)", flush=True)
        path = Path(info["path"])
        model = ServedModel(path, Tokenizer(path) if (path / "tokenizer.json").is_file() else None,
                            info["vocab_size"], info["max_context"], info["capacity_tokens"], info["reserve"],
                            info["backend"])
        server, _ = make_server(None, _options(args, path), args.log_level, args.drain_timeout,
                                worker=engine_process, model=model)
    host, port = sock.getsockname()[:2]
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"dsv3 serve: model {_options(args, model.path).model_name!r} on {url} (OpenAI base URL {url}/v1; "
          f"backend {model.backend}, cache {model.capacity_tokens} tokens"
          f"{'' if engine_process is None else ', engine in its own process'})", flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was installed
    # before it; a handler of our own turns that into a normal exit (status 0) after the drain.
    stopped = []
    before = {sig: signal.signal(sig, lambda s, f: stopped.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:                       # in-process callers (tests, embedding) get their own handlers back
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if engine_process is not None and engine_process.exit_message:
        raise Dsv3Error(engine_process.exit_message)
    return 0


def build_serving_llm(args):
    """The LLM a server runs (in the engine process, or on rank 0's engine thread), set up from the
    flags. A module-level function, so the engine process can be spawned with it."""
    llm = build_llm(args)
    engine = llm.engine
    set_serving_threads(engine.device, cpu_threads(args))     # after loading, which may use them all
    engine.prefix_caching = not args.no_prefix_caching
    engine.max_waiting = args.max_waiting
    if args.max_batch_tokens:
        engine.max_batch_tokens = args.max_batch_tokens
    return llm


def _options(args, path: Path):
    from dsv3.serve.app import ServeOptions
    return ServeOptions(model_name=args.served_model_name or path.name, api_key=args.api_key or None,
                        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                        stuck_after_s=args.stuck_timeout)


def _serve_in_thread(args, llm):
    """The engine on a thread of this process (torchrun, or --engine-thread): (server, model), or
    (None, None) on ranks > 0, which step in lockstep with rank 0 until it stops."""
    from dsv3.serve.app import ServedModel
    from dsv3.serve.server import make_server
    engine = llm.engine
    if not args.no_warmup:         # every rank: the warm-up's collectives run in lockstep
        began = time.perf_counter()
        steps = engine.warm_up()
        if llm.mesh.rank == 0:
            print(f"dsv3 serve: warmed up in {time.perf_counter() - began:.1f} s ({steps} steps)", flush=True)
    if llm.mesh.rank != 0:
        # Under torchrun only rank 0 serves HTTP; the others step in lockstep with it. torchrun passes
        # SIGTERM to every rank: these ranks ignore it and end when rank 0, having drained, says so.
        from dsv3.serve.worker import follow, follow_group
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        (follow_group if llm.mesh.data_parallel else follow)(engine, llm.mesh)
        return None, None
    server, _ = make_server(llm, _options(args, llm.path), args.log_level, args.drain_timeout)
    return server, ServedModel.of(llm)
