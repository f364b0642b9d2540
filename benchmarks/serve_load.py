"""Serving benchmark: output tokens/s and time to first token versus request rate, continuous batching
against static batching on the same backend.

Requests arrive as a Poisson process at each rate (`inf`: all at once); each has a random prompt of
token ids (uniform in [L/2, 3L/2]) and a fixed number of output tokens (ignore_eos). Three ways to
serve the same arrivals:

  static       in-process: a batch of up to --static-batch arrived requests runs to completion,
               the next batch starts after it (new requests wait for the whole batch)
  continuous   in-process: requests join the running batch at the next step (the engine as is)
  http         `dsv3-run serve` on loopback (in this process, a thread), streamed to a minimal HTTP/SSE
               client in a second process: continuous batching plus the HTTP, SSE and detokenizer costs
  http-process the same with the engine in a process of its own (what `dsv3-run serve` runs)

`--engine stub` swaps the model for a stub engine that makes --stub-tokens-per-step tokens per request
per step with no model at all (steps of --stub-step-ms): an HTTP-side stress measurement, what the
server can stream, never a model's throughput.

TTFT is measured from each request's arrival time to its first output token (http: first streamed
chunk); throughput is output tokens over the time from the first arrival to the last token. The
http-process rows also give the HTTP process's CPU time per streamed token: its per-token cost, which
the machine's other load disturbs less than tokens/s.

    python benchmarks/serve_load.py                                   # CPU, tiny random model
    python benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 1,4,16,inf \\
        --prompt-len 512 --output-len 128 --num-requests 256 --static-batch 64 --out benchmarks/results/serve_h100.md
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from dsv3.commands.options import set_serving_threads


@dataclass
class Req:
    arrival: float                  # seconds after the start
    prompt: list[int]
    first: float | None = None      # first output token, seconds after the start
    done: float | None = None
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def make_requests(n: int, rate: float, prompt_len: int, output_len: int, vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        length = rng.randint(max(1, prompt_len // 2), max(1, prompt_len * 3 // 2))
        out.append(Req(t, [rng.randrange(2, vocab) for _ in range(length)]))
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return out


def run_in_process(engine, reqs: list[Req], output_len: int, static_batch: int | None,
                   stalls: list[str] | None = None) -> list[float]:
    """Serve `reqs` on this thread. static_batch=None: continuous; else static batches of that size.
    Returns the wall time of every engine step (seconds); steps over 250 ms are described in `stalls`
    (with the Triton kernels compiled meanwhile) when it is given."""
    from dsv3.core.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    pending, index, steps = deque(reqs), {}, []
    t0 = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        if static_batch is None or not engine.has_work():
            room = len(pending) if static_batch is None else static_batch
            while pending and pending[0].arrival <= now and room > 0:
                r = pending.popleft()
                index[engine.add(r.prompt, params).id] = r
                room -= 1
        if not engine.has_work():
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
            continue
        began, before = time.perf_counter(), (engine.stats.prefill_tokens, len(engine.running))
        outs = engine.step()
        steps.append(time.perf_counter() - began)
        if stalls is not None and steps[-1] > 0.25:
            stalls.append(f"{steps[-1] * 1000:.0f} ms step: {engine.stats.prefill_tokens - before[0]} prompt tokens "
                          f"with {before[1]} running; compiled: {', '.join(new_triton_kernels()) or 'nothing'}")
        now = time.perf_counter() - t0
        for o in outs:
            r = index[o.seq.id]
            if o.new_tokens and r.first is None:
                r.first = now
            r.tokens += len(o.new_tokens)
            if o.finished:
                r.done = now
    return steps


_seen_kernels: set[str] = set()


def new_triton_kernels() -> list[str]:
    """Kernels that entered Triton's on-disk cache since the last call: what a slow step compiled."""
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    entries = {d.name: d for d in root.iterdir()} if root.is_dir() else {}
    fresh = [d for name, d in entries.items() if name not in _seen_kernels]
    _seen_kernels.update(entries)
    return sorted({j.stem for d in fresh for j in d.glob("*.json") if not j.name.startswith("__")})


def _http_client(url: str, model_name: str, reqs: list[Req], output_len: int) -> list[Req]:
    """Stream every request over its own connection at its arrival time. Runs in a process of its own
    and speaks HTTP/SSE directly (asyncio streams, JSON parsed only for the usage chunk): a client
    library's per-chunk parsing would otherwise be what is measured on a small CPU box."""
    import json
    host, port = url.removeprefix("http://").split(":")

    async def one(r: Req, t0: float):
        await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
        body = json.dumps({"model": model_name, "prompt": r.prompt, "max_tokens": output_len, "temperature": 0,
                           "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            r.errors.append(status.decode().strip() + " " + (await reader.read()).decode()[-300:])
            writer.close()
            return
        async for line in reader:                  # chunked transfer encoding: size lines, data lines
            if not line.startswith(b"data: "):
                continue
            if r.first is None:
                r.first = time.perf_counter() - t0
            if b'"usage"' in line:
                r.tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif line.startswith(b"data: [DONE]"):
                break
        r.done = time.perf_counter() - t0
        writer.close()

    async def main():
        t0 = time.perf_counter()
        await asyncio.gather(*(one(r, t0) for r in reqs))
    asyncio.run(main())
    return reqs


def run_http(llm, reqs: list[Req], output_len: int, model_name: str) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dsv3.serve.app import ServeOptions
    from dsv3.serve.server import ServerThread
    llm.engine.max_waiting = None
    with ServerThread(llm, ServeOptions(model_name)) as server, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(time.sleep, 0).result()      # the client process is up before the clock starts
        done = pool.submit(_http_client, server.url, model_name, reqs, output_len).result()
    reqs[:] = done


class EngineProcessServer:
    """`dsv3-run serve`'s default layout for the "http-process" mode: the engine in a process of its
    own, built there by `build(*build_args)`, behind the HTTP server in this process."""

    def __init__(self, build, build_args: tuple, model_name: str):
        from dsv3.core.tokenizer import Tokenizer
        from dsv3.serve.app import ServedModel, ServeOptions
        from dsv3.serve.engine_process import EngineProcess
        from dsv3.serve.server import ServerThread
        self.engine = EngineProcess(build, build_args, warm_up=True)
        began = time.perf_counter()
        info = self.engine.launch()
        print(f"engine process ready in {time.perf_counter() - began:.1f} s (warm-up {info['warm_up_s']:.1f} s)",
              file=sys.stderr, flush=True)
        path = Path(info["path"])
        model = ServedModel(path, Tokenizer(path), info["vocab_size"], info["max_context"], info["capacity_tokens"],
                            info["reserve"], info["backend"])
        self.model_name = model_name
        self.thread = ServerThread(None, ServeOptions(model_name), worker=self.engine, model=model).__enter__()

    def run(self, reqs: list[Req], output_len: int) -> tuple[float, tuple[int, float, dict]]:
        """Serve `reqs`; returns the CPU seconds this process (the HTTP side: uvicorn, the event receiver,
        tokenizing) spent meanwhile, and (engine steps, seconds in them, {phase: seconds}) over the run."""
        import multiprocessing
        import resource
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(time.sleep, 0).result()
            steps_before = engine_step_totals(self.thread.url)
            before = resource.getrusage(resource.RUSAGE_SELF)
            reqs[:] = pool.submit(_http_client, self.thread.url, self.model_name, reqs, output_len).result()
            after = resource.getrusage(resource.RUSAGE_SELF)
            steps_after = engine_step_totals(self.thread.url)
        return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                (steps_after[0] - steps_before[0], steps_after[1] - steps_before[1],
                 {p: v - steps_before[2].get(p, 0.0) for p, v in steps_after[2].items()}))

    def close(self) -> None:
        self.thread.__exit__(None, None, None)


def build_for_engine_process(full_width_layers, backend, max_cache_tokens, max_batch_tokens, threads, stub=None):
    """What the engine process runs: the same model and engine settings as the in-process modes
    (`stub`: StubEngine's (tokens_per_step, step_ms) instead of a model), and the torch threads
    `dsv3-run serve` gives its engine (dsv3.commands.options.serving_threads)."""
    if stub is not None:
        return stub_llm(*stub)
    if full_width_layers:
        llm = full_width_llm(full_width_layers, backend, max_cache_tokens or 65536, max_batch_tokens)
    else:
        llm = tiny_llm(max_cache_tokens)
        llm.engine.max_batch_tokens = max_batch_tokens
    llm.engine.prefix_caching, llm.engine.max_waiting = False, None
    set_serving_threads(llm.engine.device, threads)
    return llm


def summarize(reqs: list[Req], steps: list[float], step_totals: tuple | None = None) -> dict:
    """`steps`: every engine step's seconds (in-process modes); `step_totals`: (steps, their seconds) as the
    engine process's dsv3_engine_step_seconds counted them over the run (http-process)."""
    ok = [r for r in reqs if r.done is not None and not r.errors]
    ttft = sorted(r.first - r.arrival for r in ok)
    span = max(r.done for r in ok) - min(r.arrival for r in reqs)
    if steps:
        step_totals = (len(steps), sum(steps))

    def pct(q):
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000
    busy = "-"
    if step_totals and step_totals[0]:
        n, total = step_totals[:2]
        busy = f"{n}, {total / n * 1000:.2f} ms, {100 * total / span:.0f}%"
    return {"tok_s": sum(r.tokens for r in ok) / span, "ttft_mean": statistics.mean(ttft) * 1000,
            "ttft_p50": pct(0.5), "ttft_p90": pct(0.9), "errors": len(reqs) - len(ok),
            "steps": f"{statistics.median(steps) * 1000:.1f} / {max(steps) * 1000:.0f}" if steps else "-",
            "busy": busy}


def engine_step_totals(url: str) -> tuple[int, float, dict]:
    """(steps, seconds in them, {phase: host seconds}) so far, from the server's /metrics
    (dsv3_engine_step_seconds, dsv3_engine_phase_seconds_total)."""
    import urllib.request
    count = total = 0.0
    phases = {}
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode().splitlines():
        if line.startswith("dsv3_engine_step_seconds_count"):
            count = float(line.split()[-1])
        elif line.startswith("dsv3_engine_step_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith('dsv3_engine_phase_seconds_total{phase="'):
            phases[line.split('"')[1]] = float(line.split()[-1])
    return int(count), total, phases


def phase_row(rate: str, mode: str, steps: int, phases: dict) -> str:
    """Mean host ms per step in each phase of Engine.step (dsv3.core.engine.STEP_PHASES)."""
    from dsv3.core.engine import STEP_PHASES
    if not any(phases.values()):          # the stub engine has no phases
        return f"| {rate} | {mode} | {steps} |" + " - |" * len(STEP_PHASES)
    cells = " | ".join(f"{phases.get(p, 0.0) / max(1, steps) * 1000:.2f}" for p in STEP_PHASES)
    return f"| {rate} | {mode} | {steps} | {cells} |"


def tiny_llm(max_cache_tokens: int | None):
    """The tiny random DeepSeek-V3 (tests' config) written to a temp dir, on the CPU."""
    from dsv3 import LLM
    from dsv3.core.config import ModelConfig
    from dsv3.checkpoints.synthetic import TINY_CONFIG, random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer
    path = Path(tempfile.mkdtemp()) / "tiny-random"
    path.mkdir()
    write_tokenizer(path, TINY_CONFIG["vocab_size"], ["def add(a, b):\n    return a + b\n", "hello world " * 20])
    write_checkpoint(path, TINY_CONFIG, to_checkpoint_format(
        random_weights(ModelConfig.from_hf(TINY_CONFIG), 0, std=0.3), "dense", torch.float32), 1, "dense")
    overrides = {"kv_cache.max_tokens": max_cache_tokens} if max_cache_tokens else {}
    return LLM(path, backend="cpu", **overrides)


class StubEngine:
    """HTTP-side stress only: the Engine's serving interface with no model. Every running request
    gets `tokens_per_step` tokens (and their text) per step; a step takes `step_ms` (0: as fast as
    the loop turns). What it measures is the server's cost per streamed token, not a model's speed."""

    def __init__(self, tokenizer, tokens_per_step: int, step_ms: float):
        from dsv3.core.engine import EngineStats
        self.tokens_per_step, self.step_s = tokens_per_step, step_ms / 1000
        self.max_context = self.capacity_tokens = 1 << 20
        self.reserve, self.max_waiting, self.isolate_failures, self.prefix_caching = 0, None, True, False
        self.stats, self.running, self.waiting = EngineStats(), [], []
        self.cache = SimpleNamespace(allocator=SimpleNamespace(num_used=0, num_blocks=1, num_evictable=0, num_free=1))
        ids = range(2, tokenizer.vocab_size)
        self._text = {t: tokenizer.decode([t]) for t in ids}     # one piece per id: the text side stays cheap
        self._ids = list(self._text)

    def warm_up(self) -> int:
        return 0

    def has_work(self) -> bool:
        return bool(self.running)

    def add(self, prompt: list[int], params):
        return self.add_choices(prompt, [params])[0]

    def add_choices(self, prompt: list[int], params: list):
        from dsv3.core.scheduler import Sequence
        seqs = [Sequence(list(prompt), len(prompt), p) for p in params]
        self.running += seqs
        return seqs

    def release(self, seq) -> None:
        if seq in self.running:
            self.running.remove(seq)

    def step(self) -> list:
        from dsv3.core.engine import StepOutput
        if self.step_s:
            time.sleep(self.step_s)
        outputs, ids = [], self._ids
        for s in self.running:
            made = len(s.token_ids) - s.prompt_len
            n = min(self.tokens_per_step, s.params.max_new_tokens - made)
            new = [ids[(made + i) % len(ids)] for i in range(n)]
            s.token_ids += new
            if made + n >= s.params.max_new_tokens:
                s.finish_reason = "length"
            outputs.append(StepOutput(s, "".join(self._text[t] for t in new), s.finished, new))
        self.running = [s for s in self.running if not s.finished]
        self.stats.steps += 1
        self.stats.generated_tokens += sum(len(o.new_tokens) for o in outputs)
        return outputs


def stub_llm(tokens_per_step: int, step_ms: float):
    """A StubEngine behind the tiny model's tokenizer (so the HTTP side tokenizes and streams as usual)."""
    from dsv3.checkpoints.synthetic import write_tokenizer
    from dsv3.core.tokenizer import Tokenizer
    path = Path(tempfile.mkdtemp()) / "stub-engine"
    path.mkdir()
    write_tokenizer(path, 512, ["def add(a, b):\n    return a + b\n", "hello world " * 20])
    tok = Tokenizer(path)
    return SimpleNamespace(engine=StubEngine(tok, tokens_per_step, step_ms), tokenizer=tok, path=path,
                           config=SimpleNamespace(vocab_size=512), spec=SimpleNamespace(name="stub"))


def full_width_llm(layers: int, backend: str, max_cache_tokens: int, max_batch_tokens: int):
    """DeepSeek-V3 at full width and reduced depth with random FP8 weights made on the GPU (as
    `dsv3-run bench` builds it), behind the same Engine and the same model runner (CUDA graphs for
    decode on `cuda`) that `dsv3-run serve` gets from the backend's default profile; a small BPE
    tokenizer for the text side."""
    from dsv3.commands.bench import build_model
    from dsv3.core.cache import LatentCache
    from dsv3.core.engine import Engine
    from dsv3.core.profile import load_profile, with_overrides
    from dsv3.checkpoints.synthetic import write_tokenizer
    from dsv3.core.tokenizer import Tokenizer
    from dsv3.plugins.manager import create_registry
    registry = create_registry()
    model, cfg, _, _ = build_model(registry, backend, layers)
    spec = registry.backend(backend)
    profile = with_overrides(load_profile(spec.default_profile), {"kv_cache.max_tokens": max_cache_tokens})
    runner = registry.pm.hook.dsv3_model_runner(backend=spec.name, model=model, profile=profile)
    path = Path(tempfile.mkdtemp()) / f"deepseek-v3-{layers}-layers-random"
    path.mkdir()
    write_tokenizer(path, cfg.vocab_size, ["def add(a, b):\n    return a + b\n", "hello world " * 20])
    tok = Tokenizer(path)
    block = 64
    cache = LatentCache(model.num_cache_layers, -(-max_cache_tokens // block), block, cfg.latent_dim,
                        torch.bfloat16, "cuda")
    engine = Engine(model, cache, tok, max_batch_tokens, runner)
    return SimpleNamespace(engine=engine, tokenizer=tok, config=cfg, path=path, model=model, cache=cache,
                           runner=runner, spec=spec)


def reset(engine) -> None:
    from dsv3.core.engine import EngineStats
    assert not engine.has_work()
    engine.stats = EngineStats()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full-width-layers", type=int, help="GPU: DeepSeek-V3 full width with this many layers "
                   "(random FP8 weights); default: the tiny random model on the CPU")
    p.add_argument("--backend", default="cuda", help="backend of the full-width model (cuda, rocm)")
    p.add_argument("--rates", default="8,32,128,inf", help="request rates per second (inf: all at once)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--static-batch", type=int, default=16, help="batch size of the static baseline")
    p.add_argument("--max-cache-tokens", type=int, help="latent cache size (default: the profile's)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--modes", default="static,continuous,http,http-process",
                   help="static and continuous: the engine called in this process; http: the server with the "
                        "engine on a thread of its process; http-process: the engine in a process of its own "
                        "(what `dsv3-run serve` runs)")
    p.add_argument("--engine", choices=("model", "stub"), default="model",
                   help="stub: HTTP-side stress, no model (StubEngine); its tok/s are what the server can "
                        "stream, not a model's")
    p.add_argument("--stub-tokens-per-step", type=int, default=1, help="stub: tokens per request per step")
    p.add_argument("--stub-step-ms", type=float, default=0.0, help="stub: the time one step takes")
    p.add_argument("--threads", type=int, help="torch CPU threads of the engine, in-process and in the engine "
                   "process (default: what `dsv3-run serve` sets: 1 on a GPU, all cores but one on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args(argv)
    stub = (args.stub_tokens_per_step, args.stub_step_ms) if args.engine == "stub" else None
    if stub is not None:
        llm = stub_llm(*stub)
        what = (f"NO MODEL: StubEngine, {stub[0]} token(s) per request per step, steps of {stub[1]:g} ms "
                f"(HTTP-side stress: what the server streams, not a model's throughput)")
    elif args.full_width_layers:
        llm = full_width_llm(args.full_width_layers, args.backend, args.max_cache_tokens or 65536,
                             args.max_batch_tokens)
        what = (f"DeepSeek-V3 full width, {args.full_width_layers} layers, random FP8 weights, "
                f"backend {args.backend}, {torch.cuda.get_device_name()}")
    else:
        llm = tiny_llm(args.max_cache_tokens)
        llm.engine.max_batch_tokens = args.max_batch_tokens
        what = "tiny random DeepSeek-V3 (hidden 64, 3 layers, vocab 512), reference backend on the CPU"
    if stub is None:      # the in-process engine gets the threads the engine process gets: like with like
        threads = set_serving_threads(llm.engine.device, args.threads)
        what += f", {threads} torch threads (as `dsv3-run serve` sets them)"
    llm.engine.prefix_caching = False          # random prompts share nothing; keep the modes comparable
    vocab = llm.config.vocab_size
    modes = args.modes.split(",")
    # warm up outside the measurements: first-call allocations, kernel compilation (Triton specialises
    # on shapes, so mixed prefill/decode steps of many sizes) and, on cuda, the capture of each decode
    # batch-size bucket, which would otherwise stall the first measured run that meets it for seconds
    if args.full_width_layers:
        began = time.perf_counter()
        steps = llm.engine.warm_up()               # what `dsv3-run serve` does before opening its port
        print(f"Engine.warm_up: {steps} steps in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        for mode in modes:                         # then every mode at full length and load
            reqs = make_requests(args.num_requests, float("inf"), args.prompt_len, args.output_len, vocab, 1)
            if mode == "http":
                run_http(llm, reqs, args.output_len, llm.path.name)
            else:
                run_in_process(llm.engine, reqs, args.output_len, args.static_batch if mode == "static" else None)
        if llm.runner is not None:
            what += f", decode through {type(llm.runner).__name__} (buckets {sorted(llm.runner.graphs)} captured)"
    else:
        run_in_process(llm.engine, make_requests(4, float("inf"), args.prompt_len, 4, vocab, 1), 4, None)
    stalls = None                                  # slow engine steps of the measured runs (GPU)
    if args.full_width_layers:
        new_triton_kernels()                       # what the warm-up compiled is not news
        stalls = []
    captured = len(llm.runner.graphs) if args.full_width_layers and llm.runner is not None else 0
    reset(llm.engine)
    table = [f"Model: {what}.",
             (f"{args.num_requests} requests per rate, prompts {args.prompt_len // 2}-{args.prompt_len * 3 // 2} "
              f"tokens, {args.output_len} output tokens each (ignore_eos); static batch {args.static_batch}; "
              f"max_batch_tokens {args.max_batch_tokens}; cache {llm.engine.capacity_tokens} tokens; "
              f"prefix caching off."), "",
             ("| rate (req/s) | mode | output tok/s | TTFT mean (ms) | TTFT p50 (ms) | TTFT p90 (ms) | "
              "engine step p50 / max (ms) | engine steps, mean step, busy | HTTP process CPU (µs/token) | errors |"),
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    separate = (EngineProcessServer(build_for_engine_process, (args.full_width_layers, args.backend,
                                                               args.max_cache_tokens, args.max_batch_tokens,
                                                               args.threads, stub), llm.path.name)
                if "http-process" in modes else None)
    if separate is not None:                       # its first requests meet first calls too
        separate.run(make_requests(args.num_requests, float("inf"), args.prompt_len, args.output_len, vocab, 1),
                     args.output_len)
    phase_table = ["", "Engine step phases, mean host ms per step (schedule; prepare: build the batch; launch: "
                   "enqueue forward and sampling; wait: the device->host read; post: detokenise, stops, draft):", "",
                   "| rate (req/s) | mode | steps | schedule | prepare | launch | wait | post |",
                   "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rate_s in args.rates.split(","):
        rate = float(rate_s)
        for mode in modes:
            reqs = make_requests(args.num_requests, rate, args.prompt_len, args.output_len, vocab, args.seed)
            steps, cpu, totals = [], "-", None
            if mode == "http-process":
                seconds, totals = separate.run(reqs, args.output_len)
                cpu = f"{seconds * 1e6 / max(1, sum(r.tokens for r in reqs)):.1f}"
            elif mode == "http":
                run_http(llm, reqs, args.output_len, llm.path.name)
            else:
                steps = run_in_process(llm.engine, reqs, args.output_len,
                                       args.static_batch if mode == "static" else None, stalls)
            s = summarize(reqs, steps, totals)
            if totals is not None:
                phase_table.append(phase_row(rate_s, mode, totals[0], totals[2]))
            elif mode != "http":
                phase_table.append(phase_row(rate_s, mode, len(steps), llm.engine.stats.phases))
            print(f"rate {rate_s:>5} {mode:>10}: {s['tok_s']:8.1f} tok/s  TTFT mean {s['ttft_mean']:8.1f} ms  "
                  f"p50 {s['ttft_p50']:8.1f}  p90 {s['ttft_p90']:8.1f}  step p50/max {s['steps']} ms  engine steps, mean, "
                  f"busy {s['busy']}  HTTP CPU {cpu} µs/token  errors {s['errors']}", file=sys.stderr,
                  flush=True)
            table.append(f"| {rate_s} | {mode} | {s['tok_s']:.1f} | {s['ttft_mean']:.1f} | {s['ttft_p50']:.1f} | "
                         f"{s['ttft_p90']:.1f} | {s['steps']} | {s['busy']} | {cpu} | {s['errors']} |")
            if args.out:      # after every row: a run cut short by a time limit keeps what it measured
                Path(args.out).write_text("\n".join(table) + "\n")
            reset(llm.engine)
    table += phase_table
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    if args.full_width_layers and llm.runner is not None and len(llm.runner.graphs) != captured:
        table.append(f"\nNote: buckets {sorted(llm.runner.graphs)} by the end: some were captured during the "
                     f"measured runs, whose TTFT includes that capture.")
        if args.out:
            Path(args.out).write_text("\n".join(table) + "\n")
    if stalls:
        table += ["", "Engine steps over 250 ms during the measured runs (kernels that entered Triton's cache then):"]
        table += [f"- {line}" for line in stalls]
        if args.out:
            Path(args.out).write_text("\n".join(table) + "\n")
    if separate is not None:
        separate.close()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
