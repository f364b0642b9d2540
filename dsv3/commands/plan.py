"""`dsv3-run plan`: how many GPUs a checkpoint needs under a profile, and how each one's memory splits."""
from __future__ import annotations

import math
import re

EXAMPLES = """examples:
  dsv3-run plan --config config.json --profile cuda-fp8 --gpu-memory 80GiB
  dsv3-run plan --model ~/DeepSeek-V3 --profile cuda-fp8 --gpu-memory 141GiB --max-cache-tokens 65536
  dsv3-run plan --model ~/DeepSeek-V3 --profile cuda-bf16 --gpu-memory 80GiB --tp 8 --ep 16
"""
_UNITS = {"": 2**30, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30,
          "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def register(subparsers) -> None:
    import argparse
    p = subparsers.add_parser(
        "plan", help="how many GPUs a checkpoint needs and how memory splits",
        description="For a checkpoint (or its config.json), a profile and the memory of one GPU: the smallest "
                    "number of GPUs that holds the model, and per rank the weights (exact, as loading slices "
                    "them), the latent cache (exact) and activations (an estimate). Nothing is loaded.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="HF checkpoint directory (reads config.json and tensor headers)")
    src.add_argument("--config", metavar="FILE", help="a config.json alone (FP8 if it has quantization_config)")
    p.add_argument("--profile", metavar="NAME|PATH", help="profile (default: cuda-fp8, or --backend's default)")
    p.add_argument("--backend", metavar="NAME", help="use this backend's default profile")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory of one GPU: 80GiB, 141GiB, 96GB, ...")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the profile's, else the widest that fits)")
    p.add_argument("--ep", type=int, help="expert-parallel size (default: the profile's, else the widest)")
    p.add_argument("--max-cache-tokens", type=int, help="latent cache capacity in tokens (overrides the profile)")
    p.add_argument("--kv-cache-dtype", help="latent cache dtype (overrides the profile)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the torchrun line printed (default 8)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    from dsv3.core.errors import Dsv3Error
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise Dsv3Error(f"--gpu-memory {text!r}: expected a size such as 80GiB, 141GiB or 96GB (a bare number is GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def run(args) -> int:
    from pathlib import Path

    import torch

    from dsv3.core.config import ModelConfig
    from dsv3.core.errors import Dsv3Error
    from dsv3.core.loader import Checkpoint, checkpoint_format, has_mtp, mtp_copies_alike
    from dsv3.core.profile import select_profile
    from dsv3.parallel import memory
    from dsv3.parallel.sharding import layout_problems
    from dsv3.plugins.manager import create_registry

    gpu = parse_size(args.gpu_memory)
    registry = create_registry()
    profile = select_profile(registry, args.backend, args.profile or (None if args.backend else "cuda-fp8"),
                             {"kv_cache.max_tokens": args.max_cache_tokens, "kv_cache.dtype": args.kv_cache_dtype,
                              "parallel.tp": args.tp, "parallel.ep": args.ep})
    if args.model:
        ckpt = Checkpoint(args.model)
        source, cfg = ckpt.path / "config.json", ModelConfig.from_file(ckpt.path / "config.json")
        ckpt_format, with_mtp = checkpoint_format(ckpt), cfg.num_nextn_predict_layers > 0 and has_mtp(
            ckpt, cfg.num_hidden_layers)
        # the loader shares equal MTP copies; from the headers, equal shapes and dtypes are assumed equal
        shared = with_mtp and mtp_copies_alike(ckpt, cfg)
        ckpt.close()
    else:
        source, cfg = Path(args.config), ModelConfig.from_file(args.config)
        ckpt_format, with_mtp = ("fp8-block" if cfg.quantization else "dense"), cfg.num_nextn_predict_layers > 0
        shared = with_mtp                               # the official layout: equal copies
    fmt = ckpt_format if profile.weight_format == "auto" else profile.weight_format
    dtype = getattr(torch, profile.dtype)
    kv = profile.kv_cache
    cache_dtype = dtype if kv.dtype == "auto" else getattr(torch, kv.dtype)
    tp, ep = profile.parallel.tp, profile.parallel.ep
    fixed = (tp, ep) != (1, 1)

    rows, chosen = [], None
    for n in memory.candidates(tp, ep):
        layout = (tp, ep) if fixed else memory.default_layout(cfg, n, ckpt_format)
        if layout is None or layout_problems(cfg, n, *layout, ckpt_format):
            continue
        m = memory.rank_memory(cfg, n, *layout, fmt, dtype, cache_dtype, kv.max_tokens, profile.max_batch_tokens,
                               with_mtp, shared)
        rows.append(m)
        if m.total <= gpu:
            chosen = m
            break
    if not rows:
        why = f" with tp={tp}, ep={ep}: " + "; ".join(layout_problems(cfg, math.lcm(tp, ep), tp, ep, ckpt_format))
        raise Dsv3Error(f"no layout of up to {memory.MAX_GPUS} GPUs can split this model" + (why if fixed else ""))
    params = memory.parameter_count(cfg, with_mtp)
    print(f"model    {source}: {params / 1e9:.1f} B parameters, {cfg.num_hidden_layers} layers"
          f"{' + MTP' if with_mtp else ''}, {cfg.n_routed_experts} routed experts, {cfg.num_attention_heads} heads")
    print(f"profile  {profile.source}: {fmt} weights, {profile.dtype} activations, latent cache "
          f"{str(cache_dtype).removeprefix('torch.')} x {kv.max_tokens:,} tokens, {profile.max_batch_tokens:,} "
          f"tokens per step")
    print(f"GPU      {_gib(gpu)}\n")

    header = ("GPUs", "tp", "ep", "weights", "absorbed MLA", "latent cache", "activations", "reserve", "total", "fits")
    table = [header] + [(str(m.world), str(m.tp), str(m.ep), _gib(m.weights), _gib(m.absorbed), _gib(m.cache), _gib(m.activations),
                         _gib(m.reserve), _gib(m.total), "yes" if m.total <= gpu else "no") for m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    per_token = rows[0].cache_per_token
    print(f"\nlatent cache: {per_token:,} bytes per token on every rank ({cfg.num_hidden_layers + int(with_mtp)} "
          f"layers x {f'({cfg.latent_dim} + {cfg.index_head_dim} indexer)' if cfg.sparse_attention else cfg.latent_dim} values x "
          f"{torch.empty(0, dtype=cache_dtype).element_size()} bytes); MLA caches "
          f"one latent per token for all heads, so tensor parallelism does not split it")
    print("activations: an estimate for one step (dsv3.parallel.memory says what it counts); reserve: context, "
          "collective buffers, allocator slack")
    if with_mtp:
        last = chosen or rows[-1]
        copies = _gib(last.mtp_copies)
        print(f"MTP layer: its embed_tokens and shared_head.head ({copies} per rank at tp {last.tp}) are counted once, shared with the "
              f"main model's, as the loader does when the checkpoint's copies are equal bit for bit (the official "
              f"checkpoints' are; {'assumed from the headers' if args.model else 'assumed for a config alone'}); "
              f"if they differ, each rank needs {copies} more" if shared else
              f"MTP layer: its embed_tokens and shared_head.head ({copies} per rank at tp {last.tp}) are counted on their own: the "
              f"checkpoint stores them unlike the main model's (shape or dtype), so the loader cannot share them")
    if chosen is None:
        last = rows[-1]
        print(f"\ndoes not fit: on {last.world} GPUs of {_gib(gpu)} each rank needs {_gib(last.total)}; use GPUs "
              f"with more memory, a smaller latent cache (--max-cache-tokens), or a smaller weight format")
        return 1
    m = chosen
    print(f"\nneeds {m.world} GPU{'s' if m.world > 1 else ''} (tp {m.tp}, ep {m.ep}): per rank {_gib(m.weights)} "
          f"weights + {_gib(m.absorbed)} absorbed MLA weights + {_gib(m.cache)} latent cache + {_gib(m.activations)} activations + {_gib(m.reserve)} "
          f"reserve = {_gib(m.total)} of {_gib(gpu)}; the memory left would hold "
          f"{m.tokens_that_fit(gpu) - m.cache_tokens:,} more cache tokens ({m.tokens_that_fit(gpu):,} in all)")
    if m.world > 1:
        nodes = -(-m.world // args.gpus_per_node)
        per_node = min(m.world, args.gpus_per_node)
        multi = f"--nnodes {nodes} --node-rank $NODE_RANK --master-addr $HEAD_ADDR " if nodes > 1 else ""
        runtime = f"--backend {args.backend}" if args.backend and not args.profile else \
            f"--profile {args.profile or 'cuda-fp8'}"
        print(f"launch:  torchrun {multi}--nproc-per-node {per_node} --no-python dsv3-run --model "
              f"{args.model or 'DIR'} {runtime} --tp {m.tp} --ep {m.ep} ...")
    return 0
