"""The flags every model-building command shares, and the `LLM` they describe."""
from __future__ import annotations

import argparse
import os
import sys

from dsv3.core.errors import Dsv3Error


# Below this many bytes of weights a CPU decode step is a few hundred small GEMMs: a second torch thread
# saves little on an idle machine and costs several times over on a busy one (the demo model on 2
# shared cores: 16.3 s for the README's first command with 2 threads, 3.5 s with 1;
# benchmarks/results/demo_eval.md).
SMALL_MODEL_BYTES = 512 << 20


def cpu_threads(args) -> int | None:
    """The torch thread count a CPU run sets before it loads anything (loading runs threaded too), or
    None to leave torch's own: --threads, else OMP_NUM_THREADS's (torch's own), else 1 when the
    checkpoint's safetensors files are small."""
    if getattr(args, "threads", None):
        return args.threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    from pathlib import Path
    from dsv3.demo import demo_model_path
    model_dir = Path(args.model) if args.model else demo_model_path()
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.is_dir() else 0
    return 1 if 0 < size < SMALL_MODEL_BYTES else None


def serving_threads(device, threads: int | None) -> int | None:
    """Torch threads of a serving engine, whose machine also runs the HTTP process and, often, clients:
    `threads` when given (--threads, or cpu_threads' rule), None under OMP_NUM_THREADS (torch's own); else 1
    on a GPU backend (its host side is Python and small tensors; vLLM's GPU workers take 1 too) and all
    cores but one on the CPU. A thread pool as wide as the machine stalls at every parallel region whenever
    another process holds a core: on 2 cores, serve_load's tiny model stepped at 206 ms in the engine process
    with 2 torch threads against 25 ms with 1 (benchmarks/results/h200-session5.md)."""
    if threads:
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if getattr(device, "type", device) != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def set_serving_threads(device, threads: int | None) -> int:
    """Set serving_threads(device, threads) (left alone when None); returns torch's thread count."""
    import torch
    if (n := serving_threads(device, threads)) is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a model: model, backend, profile, plugins, overrides."""
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", metavar="DIR", help="HF checkpoint directory (default: the embedded demo model)")
    g.add_argument("--backend", metavar="NAME", help="backend or alias: cpu, cuda/nvidia, rocm/amd, ascend/npu, "
                   "or a plugin's; uses its default profile")
    g.add_argument("--profile", metavar="NAME|PATH", help="a shipped profile name (see `dsv3-run profiles`) or a YAML file")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="activation dtype (overrides the profile)")
    g.add_argument("--weight-format", choices=("auto", "dense", "fp8-block", "fp8-fnuz", "int8-w8a8"),
                   help="run weights in this format, converting at load (overrides the profile)")
    g.add_argument("--kv-cache-dtype", help="latent cache dtype (overrides the profile)")
    g.add_argument("--max-cache-tokens", type=int, help="latent cache capacity in tokens (overrides the profile)")
    g.add_argument("--device", help="torch device, e.g. cuda:1 (overrides the profile; default: the backend's)")
    g.add_argument("--speculative", choices=("none", "mtp"), help="speculative decoding method")
    g.add_argument("--num-draft-tokens", type=int, help="MTP draft tokens per step (k)")
    g.add_argument("--draft-policy", choices=("adaptive", "always"),
                   help="adaptive (default): draft only while it pays at the running batch size; always: every step")
    g.add_argument("--tp", type=int, help="tensor-parallel size (attention heads, dense MLPs, vocab); under torchrun")
    g.add_argument("--ep", type=int, help="expert-parallel size (routed experts); under torchrun")
    g.add_argument("--dp", type=int, help="data-parallel attention groups (each serves its own sequences; "
                   "dp x tp = the number of processes); under torchrun")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: OMP_NUM_THREADS if set; "
                   f"else 1 for a model under {SMALL_MODEL_BYTES >> 20} MiB, such as the demo, and torch's default "
                   "above; `serve` then gives its engine 1 on a GPU backend, all cores but one on the CPU)")
    add_plugin_args(g)


def add_plugin_args(g) -> None:
    """-p / --plugin / --debug: every command that builds a plugin registry takes them."""
    g.add_argument("-p", dest="plugins", action="append", default=[], metavar="NAME",
                   help="load a plugin by entry-point name or module (even with autoload off); "
                        "-p no:NAME blocks one, built-ins included (pytest's conventions)")
    g.add_argument("--plugin", dest="plugin_modules", action="append", default=[], metavar="MODULE",
                   help="import MODULE and register it as a plugin")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def profile_overrides(args) -> dict:
    return {"dtype": args.dtype, "weight_format": args.weight_format, "kv_cache.dtype": args.kv_cache_dtype,
            "kv_cache.max_tokens": args.max_cache_tokens, "device": args.device,
            "speculative.method": getattr(args, "speculative", None),
            "speculative.num_draft_tokens": getattr(args, "num_draft_tokens", None),
            "speculative.policy": getattr(args, "draft_policy", None),
            "parallel.tp": getattr(args, "tp", None), "parallel.ep": getattr(args, "ep", None),
            "parallel.dp": getattr(args, "dp", None)}


def build_llm(args):
    from dsv3.llm import LLM
    from dsv3.plugins.manager import create_registry
    from dsv3.parallel.launch import world_size
    # under torchrun every rank runs this command; only rank 0 prints results (errors print everywhere)
    if world_size() > 1 and getattr(args, "interactive", False):
        raise Dsv3Error("--interactive is not supported under torchrun yet (stdin reaches one rank only); use "
                        "--prompt or --input-file")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise Dsv3Error(f"--threads {args.threads}: give a thread count of at least 1")
    if (threads := cpu_threads(args)) is not None:     # a CPU run's; a GPU backend's host side rarely minds
        import torch
        torch.set_num_threads(threads)
    registry = create_registry(plugins=args.plugins, modules=args.plugin_modules)
    llm = LLM(args.model, backend=args.backend, profile=args.profile, registry=registry,
              **{k: v for k, v in profile_overrides(args).items() if k != "dtype"}, dtype=args.dtype)
    if llm.mesh.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return llm
