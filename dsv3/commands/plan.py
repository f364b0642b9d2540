"""`dsv3-run plan`: how many GPUs a checkpoint needs under a profile, and how each one's memory splits."""
from __future__ import annotations

import math
import re

EXAMPLES = """examples:
  dsv3-run plan --config config.json --profile cuda-fp8 --gpu-memory 80GiB
  dsv3-run plan --model ~/DeepSeek-V3 --profile cuda-fp8 --gpu-memory 141GiB --max-cache-tokens 65536
  dsv3-run plan --model ~/DeepSeek-V3 --profile cuda-bf16 --gpu-memory 80GiB --tp 8 --ep 16
  dsv3-run plan --config config.json --profile cuda-fp8 --gpu-memory 141GiB --dp 8          # 8 GPUs, ep 8
  dsv3-run plan --config config.json --profile cuda-fp8 --gpu-memory 141GiB --gpus 8 --dp 4  # tp 2

When the plan uses more than one GPU it ends with a comparison of the layouts of that many GPUs: the
tensor-parallel one (dp=1: every rank holds every sequence's latent cache, so the system holds one
rank's worth) against data-parallel attention (dp groups of tp ranks, each with its own sequences and
cache: dp ranks' worth of distinct tokens, for more weights per rank). Per layout: weights per rank
(exact), activations (the estimate), the cache the rest of each GPU holds, the distinct latent-cache
tokens of the whole system and the largest decode batch at 4k and 32k tokens of context.
"""
CONTEXTS = (4096, 32768)
_UNITS = {"": 2**30, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30,
          "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def register(subparsers) -> None:
    import argparse
    p = subparsers.add_parser(
        "plan", help="how many GPUs a checkpoint needs and how memory splits",
        description="For a checkpoint (or its config.json), a profile and the memory of one GPU: the smallest "
                    "number of GPUs that holds the model, and per rank the weights (exact, as loading slices "
                    "them), the latent cache (exact) and activations (an estimate); on more than one GPU, a "
                    "comparison of tensor-parallel and data-parallel-attention layouts. Nothing is loaded.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="HF checkpoint directory (reads config.json and tensor headers)")
    src.add_argument("--config", metavar="FILE", help="a config.json alone (FP8 if it has quantization_config)")
    p.add_argument("--profile", metavar="NAME|PATH", help="profile (default: cuda-fp8, or --backend's default)")
    p.add_argument("--backend", metavar="NAME", help="use this backend's default profile")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory of one GPU: 80GiB, 141GiB, 96GB, ...")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the profile's, else the widest that fits)")
    p.add_argument("--ep", type=int, help="expert-parallel size (default: the profile's, else the widest; "
                   "under --dp, the number of GPUs)")
    p.add_argument("--dp", type=int, help="data-parallel attention groups (default: the profile's parallel.dp): "
                   "dp groups of tp ranks, dp x tp GPUs, each group serving its own sequences from its own cache")
    p.add_argument("--gpus", type=int, metavar="N", help="plan exactly N GPUs (default: the fewest that hold the "
                   "model; under --dp, dp x tp)")
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
    from dsv3.parallel.sharding import dp_layout, layout_problems
    from dsv3.plugins.manager import create_registry

    gpu = parse_size(args.gpu_memory)
    registry = create_registry()
    profile = select_profile(registry, args.backend, args.profile or (None if args.backend else "cuda-fp8"),
                             {"kv_cache.max_tokens": args.max_cache_tokens, "kv_cache.dtype": args.kv_cache_dtype,
                              "parallel.tp": args.tp, "parallel.ep": args.ep, "parallel.dp": args.dp})
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
    tp, ep, dp = profile.parallel.tp, profile.parallel.ep, profile.parallel.dp
    fixed = (tp, ep) != (1, 1)
    if args.gpus is not None and args.gpus < 1:
        raise Dsv3Error(f"--gpus {args.gpus}: must be at least 1")
    if dp > 1:   # data-parallel attention: one world size, dp x tp (tp, ep as torchrun would set them)
        world = args.gpus or dp * tp
        tp, ep = dp_layout(world, dp, tp, ep)
        problems = memory.dp_problems(cfg, world, tp, ep, dp, ckpt_format)
        if problems:
            raise Dsv3Error(f"parallel = {{tp: {tp}, ep: {ep}, dp: {dp}}} on {world} GPUs cannot run this model: "
                            + "; ".join(problems))
        worlds, fixed = [world], True
    elif args.gpus:
        worlds = [args.gpus]
        layout = (tp, ep) if fixed else memory.default_layout(cfg, args.gpus, ckpt_format)
        widest = layout or (args.gpus, args.gpus)      # no layout: say why the widest split fails
        problems = layout_problems(cfg, args.gpus, *widest, ckpt_format)
        if problems:
            raise Dsv3Error(f"{args.gpus} GPUs cannot split this model with tp={widest[0]}, ep={widest[1]}"
                            + ("" if fixed else " (nor any other split)") + ": " + "; ".join(problems))
    else:
        worlds = memory.candidates(tp, ep)

    rows, chosen = [], None
    for n in worlds:
        layout = (tp, ep) if fixed else memory.default_layout(cfg, n, ckpt_format)
        if layout is None or layout_problems(cfg, n, *layout, ckpt_format, dp):
            continue
        m = memory.rank_memory(cfg, n, *layout, fmt, dtype, cache_dtype, kv.max_tokens, profile.max_batch_tokens,
                               with_mtp, shared, dp)
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

    header = ("GPUs", "tp", "ep", *(("dp",) if dp > 1 else ()), "weights", "absorbed MLA", "latent cache",
              "activations", "reserve", "total", "fits")
    _print_table([header] + [(str(m.world), str(m.tp), str(m.ep), *((str(m.dp),) if dp > 1 else ()), _gib(m.weights),
                              _gib(m.absorbed), _gib(m.cache), _gib(m.activations), _gib(m.reserve), _gib(m.total),
                              "yes" if m.total <= gpu else "no") for m in rows])
    per_token = rows[0].cache_per_token
    print(f"\nlatent cache: {per_token:,} bytes per token on every rank ({cfg.num_hidden_layers + int(with_mtp)} "
          f"layers x {f'({cfg.latent_dim} + {cfg.index_head_dim} indexer)' if cfg.sparse_attention else cfg.latent_dim} values x "
          f"{torch.empty(0, dtype=cache_dtype).element_size()} bytes); MLA caches "
          f"one latent per token for all heads, so tensor parallelism does not split it"
          + (f"; under dp = {dp} each of the {dp} groups caches its own sequences, so the system holds {dp} ranks' "
             f"worth of distinct tokens" if dp > 1 else ""))
    print("activations: an estimate for one step (dsv3.parallel.memory says what it counts"
          + (f"; under dp the MoE part counts the {dp} groups' tokens" if dp > 1 else "")
          + "); reserve: context, collective buffers, allocator slack")
    if with_mtp:
        last = chosen or rows[-1]
        copies = _gib(last.mtp_copies)
        print(f"MTP layer: its embed_tokens and shared_head.head ({copies} per rank at tp {last.tp}) are counted once, shared with the "
              f"main model's, as the loader does when the checkpoint's copies are equal bit for bit (the official "
              f"checkpoints' are; {'assumed from the headers' if args.model else 'assumed for a config alone'}); "
              f"if they differ, each rank needs {copies} more" if shared else
              f"MTP layer: its embed_tokens and shared_head.head ({copies} per rank at tp {last.tp}) are counted on their own: the "
              f"checkpoint stores them unlike the main model's (shape or dtype), so the loader cannot share them")
    compare = dict(fmt=fmt, dtype=dtype, cache_dtype=cache_dtype, with_mtp=with_mtp, shared=shared,
                   ckpt_format=ckpt_format, block_size=kv.block_size, batch_tokens=profile.max_batch_tokens)
    if chosen is None:
        last = rows[-1]
        print(f"\ndoes not fit: on {last.world} GPUs of {_gib(gpu)} each rank needs {_gib(last.total)}; use GPUs "
              f"with more memory, a smaller latent cache (--max-cache-tokens), or a smaller weight format")
        if len(worlds) == 1 and last.world > 1:
            _print_comparison(cfg, last, gpu, **compare)
        return 1
    m = chosen
    layout = f"tp {m.tp}, ep {m.ep}" + (f", dp {m.dp}" if m.dp > 1 else "")
    fit = m.tokens_that_fit(gpu)
    print(f"\nneeds {m.world} GPU{'s' if m.world > 1 else ''} ({layout}): per rank {_gib(m.weights)} "
          f"weights + {_gib(m.absorbed)} absorbed MLA weights + {_gib(m.cache)} latent cache + {_gib(m.activations)} activations + {_gib(m.reserve)} "
          f"reserve = {_gib(m.total)} of {_gib(gpu)}; the memory left would hold "
          f"{fit - m.cache_tokens:,} more cache tokens ({fit:,} in all)"
          + (f"; with dp = {m.dp} groups the system holds {m.dp} x {fit:,} = {m.dp * fit:,} distinct tokens"
             if m.dp > 1 else ""))
    if m.world > 1:
        nodes = -(-m.world // args.gpus_per_node)
        per_node = min(m.world, args.gpus_per_node)
        multi = f"--nnodes {nodes} --node-rank $NODE_RANK --master-addr $HEAD_ADDR " if nodes > 1 else ""
        runtime = f"--backend {args.backend}" if args.backend and not args.profile else \
            f"--profile {args.profile or 'cuda-fp8'}"
        print(f"launch:  torchrun {multi}--nproc-per-node {per_node} --no-python dsv3-run --model "
              f"{args.model or 'DIR'} {runtime} {f'--dp {m.dp} ' if m.dp > 1 else ''}--tp {m.tp} --ep {m.ep} ...")
        _print_comparison(cfg, m, gpu, **compare)
    return 0


def _print_table(table) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join((c.ljust(w) if i == 0 and not c[:1].isdigit() else c.rjust(w))
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def _print_comparison(cfg, planned, gpu: int, fmt, dtype, cache_dtype, with_mtp, shared, ckpt_format, block_size,
                      batch_tokens) -> None:
    """The layouts of planned.world GPUs side by side: tensor-parallel (dp = 1) against data-parallel attention."""
    from dsv3.parallel import memory
    world = planned.world
    base = (planned.tp, planned.ep) if planned.dp == 1 else None
    options = memory.compare_layouts(cfg, world, fmt, dtype, cache_dtype, batch_tokens, with_mtp, ckpt_format,
                                     shared, base)
    print(f"\nlayouts of {world} x {_gib(gpu)}, each GPU's memory after weights, activations and reserve given to the "
          f"latent cache:")
    header = ("layout", "weights", "absorbed MLA", "activations", "cache per rank", "tokens per rank",
              "distinct tokens", *(f"batch @{c // 1024}k" for c in CONTEXTS))
    table, refused = [header], []
    for o in options:
        m = o.memory
        if m is None:
            refused.append(f"{o.label}: " + "; ".join(o.problems))
            continue
        distinct = m.distinct_tokens(gpu, block_size)
        per_rank = distinct // m.dp
        cells = ((_gib(per_rank * m.cache_per_token), f"{per_rank:,}", f"{distinct:,}",
                  *(f"{o.batch(gpu, c, block_size, batch_tokens):,}" for c in CONTEXTS)) if per_rank else
                 ("does not fit", *["-"] * (3 + len(CONTEXTS) - 1)))
        table.append((o.label, _gib(m.weights), _gib(m.absorbed), _gib(m.activations), *cells))
    _print_table(table)
    print(f"weights: exact, per rank (the largest); activations: the estimate above, {batch_tokens:,} tokens per step "
          f"per group (under dp the MoE part\n  counts every group's tokens; a smaller max_batch_tokens leaves more "
          f"cache); tokens: in whole {block_size}-token cache blocks; distinct tokens: the\n  whole system's latent "
          f"cache, each token once (dp=1: tp does not split the latent and the groups are replicas, so one rank's "
          f"worth;\n  dp groups: dp ranks' worth); batch @N: sequences of N tokens decoding at once, system-wide "
          f"(per group: what one rank holds, at most\n  {batch_tokens:,}; times dp)")
    for line in refused:
        print(f"not possible: {line}")
