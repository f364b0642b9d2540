"""What the sampling features cost: output tokens/s of 64 concurrent sequences of the demo model on the
CPU, plain (greedy, sampled) and with logprobs, penalties, logit_bias, n = 4 choices and a JSON schema.

Two ways to run the same 64 requests (32 random prompt tokens, 32 output tokens, ignore_eos):

  engine   in-process: all added at once, Engine.run_to_completion (the batched sampler's own cost)
  http     64 concurrent streams against `dsv3-run serve`'s app (engine thread, this process), from a
           minimal HTTP/SSE client in a second process (usage chunk counts the tokens)

On a GPU, `--full-width-layers 4 --backend cuda` measures the engine way on DeepSeek-V3 at full width
(vocab 129,280: the logits the features work on are the real size) with random FP8 weights, as
`benchmarks/serve_load.py` builds it (CUDA graphs for decode); the HTTP way stays the CPU's.

`--before DIR` also runs this script against another checkout (e.g. `git worktree add /tmp/before
1eb3353`, the tree before the features), in a second long-lived process: requests that tree cannot
serve are skipped. Every measurement of one tree is paired with the same measurement of the other,
back to back in a random order, and the after/before ratio is the median of those pairs: the CPU is
shared, and its load changes faster than a whole round takes.

    python benchmarks/sampling_features.py --before /tmp/before --rounds 3 \\
        --out benchmarks/results/sampling_features_cpu.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "line": {"type": "integer"}}, "required": ["name", "line"]}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
# name -> (engine SamplingParams fields, HTTP body fields, choices per prompt)
VARIANTS = {
    "greedy": ({"temperature": 0.0}, {"temperature": 0.0}, 1),
    "sampled": (SAMPLED, SAMPLED, 1),
    "logprobs 5": ({**SAMPLED, "logprobs": 5}, {**SAMPLED, "logprobs": 5}, 1),
    "penalties": ({**SAMPLED, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
                  {**SAMPLED, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}, 1),
    "logit_bias x10": ({**SAMPLED, "logit_bias": tuple((100 + i, 2.0) for i in range(10))},
                       {**SAMPLED, "logit_bias": {str(100 + i): 2.0 for i in range(10)}}, 1),
    "n=4 (16 prompts)": (SAMPLED, {**SAMPLED, "n": 4}, 4),
    "json_schema": ({**SAMPLED, "grammar": "schema"}, {**SAMPLED, "response_format": {
        "type": "json_schema", "json_schema": {"name": "entry", "schema": SCHEMA}}}, 1),
}
STREAMS, PROMPT_LEN, OUTPUT_LEN = 64, 32, 32


def prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(PROMPT_LEN)] for _ in range(n)]


def engine_rate(llm, name: str) -> float | None:
    """Output tokens/s of the 64 sequences added at once; None when this tree lacks the feature."""
    import dataclasses

    from dsv3.core.sampling import SamplingParams
    fields, _, n = VARIANTS[name]
    fields = dict(fields)
    if fields.get("grammar") == "schema":
        from dsv3.core.grammar import json_schema
        fields["grammar"] = json_schema(SCHEMA)
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    if not set(fields) <= known or (n > 1 and not hasattr(llm.engine, "add_choices")):
        return None
    eng = llm.engine
    base = SamplingParams(max_new_tokens=OUTPUT_LEN, ignore_eos=True, **fields)
    seqs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts(llm.config.vocab_size, STREAMS // n, 1)):
        choices = [dataclasses.replace(base, seed=1000 * i + j) for j in range(n)]
        seqs += eng.add_choices(p, choices) if n > 1 else [eng.add(p, choices[0])]
    eng.run_to_completion()
    tokens = sum(len(s.output_ids) for s in seqs)
    return [tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)]


def _client(url: str, name: str, vocab: int) -> tuple[float, int, list[str]]:
    """64 streams at once over their own connections: (seconds, output tokens, errors)."""
    host, port = url.removeprefix("http://").split(":")
    _, body_fields, n = VARIANTS[name]
    chat = "response_format" in body_fields
    errors, tokens = [], [0]

    async def one(p: list[int], seed: int):
        body = {"model": "demo", "max_tokens": OUTPUT_LEN, "stream": True, "ignore_eos": True, "seed": seed,
                "stream_options": {"include_usage": True}, **body_fields}
        if chat:
            body["messages"] = [{"role": "user", "content": f"name and line of entry {seed}"}]
        else:
            body["prompt"] = p
        data = json.dumps(body).encode()
        path = "/v1/chat/completions" if chat else "/v1/completions"
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            errors.append(status.decode().strip() + " " + (await reader.read()).decode()[-200:])
            writer.close()
            return
        async for line in reader:
            if line.startswith(b"data: ") and b'"usage"' in line and b'"completion_tokens"' in line:
                tokens[0] += json.loads(line[6:])["usage"]["completion_tokens"]
            elif line.startswith(b"data: [DONE]"):
                break
        writer.close()

    async def main():
        await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts(vocab, STREAMS // n, 2))))
    t0 = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0, tokens[0], errors


class Worker:
    """This script in a fresh interpreter whose `import dsv3` is `tree`'s (None: this checkout), holding
    the model and a server: measure() runs one variant one way there."""

    def __init__(self, tree: str | None, model_args: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if tree:
            env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-measurements", *model_args],
                                     env=env,
                                     cwd=tree or os.getcwd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the measuring process died; see its stderr above")
        return json.loads(line)

    def measure(self, mode: str, name: str) -> list[float] | None:
        """[output tokens per wall second, per CPU second of the serving process], None if refused."""
        self.proc.stdin.write(json.dumps([mode, name]) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def serve_measurements(full_width_layers: int | None, backend: str) -> None:
    """The worker's side: report the tree, then answer [mode, variant] lines with tok/s (or null)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    torch.set_num_threads(1)
    import dsv3
    from dsv3 import LLM
    from dsv3.serve.app import ServeOptions
    from dsv3.serve.server import ServerThread
    if full_width_layers:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from serve_load import full_width_llm
        llm = full_width_llm(full_width_layers, backend, 65536, 8192)
    else:
        llm = LLM(backend=backend)
    llm.engine.max_waiting = None
    engine_rate(llm, "greedy")                      # warm: allocator, first-call costs
    root = os.path.dirname(os.path.dirname(dsv3.__file__))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = sys.stdout
    sys.stdout = sys.stderr                         # only the answers go to the pipe
    with (ServerThread(llm, ServeOptions("demo")) if not full_width_layers else _no_server()) as server, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(time.sleep, 0).result()
        out.write(json.dumps({"commit": commit, "file": dsv3.__file__}) + "\n")
        out.flush()
        for line in sys.stdin:
            mode, name = json.loads(line)
            if mode == "engine":
                rate = engine_rate(llm, name)
                if backend != "cpu":
                    torch.cuda.synchronize()
            elif full_width_layers:
                rate = None                         # the HTTP way is measured on the demo model only
            else:           # the server process's CPU time: the engine thread, the event loop, uvicorn
                c0 = time.process_time()
                seconds, tokens, errors = pool.submit(_client, server.url, name, llm.config.vocab_size).result()
                rate = None if errors else [tokens / seconds, tokens / (time.process_time() - c0)]
            out.write(json.dumps(rate) + "\n")
            out.flush()


class _no_server:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _versions() -> str:
    import importlib.metadata as md
    out = []
    for pkg in ("torch", "xgrammar", "starlette", "uvicorn"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", metavar="DIR", help="also measure the dsv3 checkout in DIR (the tree before)")
    ap.add_argument("--after", metavar="DIR", help="measure the dsv3 checkout in DIR instead of this one")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="engine,http")
    ap.add_argument("--out", help="write the table (markdown) here")
    ap.add_argument("--full-width-layers", type=int, help="GPU: DeepSeek-V3 full width at this depth, random FP8 "
                    "weights (engine mode only)")
    ap.add_argument("--backend", default="cpu", help="cpu (the demo model, default) or cuda / rocm")
    ap.add_argument("--serve-measurements", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_measurements:
        serve_measurements(args.full_width_layers, args.backend)
        return
    model_args = ["--backend", args.backend] + (["--full-width-layers", str(args.full_width_layers)]
                                                if args.full_width_layers else [])
    names, modes = args.variants.split(","), args.modes.split(",")
    trees = {"after": Worker(args.after, model_args)}
    if args.before:
        trees["before"] = Worker(args.before, model_args)
    # (tree, mode, variant, 0 wall / 1 CPU) -> samples; (mode, variant, 0 / 1) -> after/before of each pair
    rates = {(t, m, v, k): [] for t in trees for m in modes for v in names for k in (0, 1)}
    ratios = {(m, v, k): [] for m in modes for v in names for k in (0, 1)}
    began, rng = time.perf_counter(), random.Random(0)
    for r in range(args.rounds):
        for mode in modes:
            for name in names:
                # before and after back to back, in a random order: they see the same load
                order = list(trees)
                rng.shuffle(order)
                got = {t: trees[t].measure(mode, name) for t in order}
                for t, v in got.items():
                    for k in (0, 1):
                        rates[t, mode, name, k].append(None if v is None else v[k])
                if got.get("before") and got.get("after"):
                    for k in (0, 1):
                        ratios[mode, name, k].append(got["after"][k] / got["before"][k])
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    info = {t: w.info for t, w in trees.items()}
    for w in trees.values():
        w.close()

    def fmt(v, spec=",.0f"):
        return "-" if v is None else format(v, spec)

    def med(*key):
        return _median(rates[key])
    cols = [(m, k) for m in modes for k in (0, 1)]
    label = {0: "tok/s", 1: "tok per CPU-s"}
    lines = ["| request | " + " | ".join(f"{m} {label[k]}" for m, k in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(med("after", m, name, k)) for m, k in cols) + " |")
    if "sampled" in names:
        lines += ["", "Relative to `sampled` in the same tree, per CPU-second (" + " / ".join(modes) + "): " + ", ".join(
            f"{name} " + " / ".join(fmt(med("after", m, name, 1) / med("after", m, "sampled", 1), ".2f")
                                    if med("after", m, name, 1) else "-" for m in modes) for name in names)]
    if "before" in trees:
        lines += ["", f"After / before ({info['before']['commit']}), medians of the paired ratios "
                      f"(>= 1: not slower); variants the before tree serves:", "",
                  "| request | " + " | ".join(f"{m} {label[k]}" for m, k in cols) + " |",
                  "| --- |" + " ---: |" * len(cols)]
        for name in names:
            if any(ratios[m, name, k] for m, k in cols):
                lines.append(f"| {name} | " + " | ".join(fmt(_median(ratios[m, name, k]), ".2f") for m, k in cols) + " |")
    gpu = "" if args.backend == "cpu" else (f"GPU: {_device_name()}; the engine loop's CPU time is mostly its wait "
                                            f"for the device, so tok per CPU-s says little here. ")
    header = [gpu + f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads 1. The cores are shared with "
              f"other agents' jobs (load average {os.getloadavg()[0]:.1f} at the end): every cell is a median of "
              f"{args.rounds} rounds, before and after measured back to back in each, and the after/before figures "
              f"are medians of those paired ratios. Wall-clock tok/s moves with the other jobs' load (+-30% here); "
              f"tokens per CPU-second of the serving process (engine: the engine loop; http: the server process, "
              f"engine thread + event loop, client excluded) much less. {_versions()}.",
              f"After: commit {info['after']['commit']} (+ working tree); before: "
              f"{info['before']['commit'] if 'before' in info else 'not measured'} (requests it refuses: -).",
              (f"DeepSeek-V3 full width, {args.full_width_layers} layers, random FP8 weights, backend "
               f"{args.backend} on {_device_name()} (CUDA graphs for decode)" if args.full_width_layers else
               "Demo model (dsv3/demo_model, reference backend, float32)") + f", {STREAMS} sequences at once, "
              f"{PROMPT_LEN} prompt tokens (random ids) and {OUTPUT_LEN} output tokens each (ignore_eos; json_schema "
              f"stops when the object is complete): output tokens over the wall time, and over the CPU time.", ""]
    table = "\n".join(header + lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Sampling features on the {'CPU' if args.backend == 'cpu' else 'GPU'}: output tokens/s at 64 "
                    f"concurrent sequences\n\n`python benchmarks/sampling_features.py {' '.join(sys.argv[1:])}`\n\n"
                    + table + "\n")


if __name__ == "__main__":
    main()
