"""Multi-GPU runs through NCCL: correctness against world size 1, and end-to-end decode/prefill scaling.

Run each mode under torchrun (one process per GPU); rank 0 writes the results.

  check  a small FP8 model whose widths split on 128x128 blocks at tp = ep = 2: logits and greedy tokens
         through the `cuda` backend at a given (tp, ep), saved for `compare`
      torchrun --nproc-per-node 2 --no-python python benchmarks/multi_gpu.py check --tp 2 --ep 1 --dir /tmp/mg
  compare  the saved runs against the world-size-1 run (no torchrun) of the same checkpoint
  bench  full-width DeepSeek-V3, reduced depth, random FP8 weights made on each GPU: prefill tok/s and
         decode ms/step per batch size (CUDA graphs where capture works, else eager), with the share of the
         step spent in NCCL kernels (torch.profiler, eager steps)
      torchrun --nproc-per-node 2 --no-python python benchmarks/multi_gpu.py bench --layers 10 --out r.json
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3.checkpoints.synthetic import TINY_CONFIG

# the tests' tiny model, widened so that every width splits on 128-row/column blocks at tp = 2 and W/ep = 2
SMALL = dict(TINY_CONFIG, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, q_lora_rank=256,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)


def small_config(world: int) -> dict:
    """SMALL widened so that every width still splits on 128-row/column blocks at tp = ep = world
    (world <= 2 gives SMALL itself)."""
    w = max(2, world)
    return dict(SMALL, hidden_size=128 * w, intermediate_size=256 * w, moe_intermediate_size=128 * w,
                num_attention_heads=2 * w, num_key_value_heads=2 * w, n_routed_experts=max(8, w))


PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Config:\n    def __init__(self", "hello world " * 30]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def make_checkpoint(path: Path, all_experts: bool, world: int = 2) -> None:
    """all_experts: every token routes to all 8 experts, so bf16 rounding differences between layouts
    cannot flip a routing decision (with top-2 of 8, a random model turns such flips into large logit
    changes: chaos, not an error)."""
    from dsv3.core.config import ModelConfig
    from dsv3.checkpoints.synthetic import random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer
    small = small_config(world)
    cfg = dict(small, num_experts_per_tok=small["n_routed_experts"], n_group=1, topk_group=1) if all_experts else small
    weights = random_weights(ModelConfig.from_hf(cfg), seed=7, std=0.1)
    write_checkpoint(path, cfg, to_checkpoint_format(weights, "fp8-block"), num_shards=2, fmt="fp8-block")
    write_tokenizer(path, SMALL["vocab_size"], PROMPTS * 4)


def check(args) -> None:
    from dsv3 import LLM
    ckpt = Path(args.model) if args.model else Path(args.dir) / "ckpt"
    if rank() == 0 and not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args.all_experts, args.widths_for)
    if "RANK" in os.environ:   # rank 0 writes the checkpoint; the others wait for it
        local = int(os.environ.get("LOCAL_RANK", 0))
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if gpu else "gloo")
        atexit.register(dist.destroy_process_group)
        dist.barrier(device_ids=[local] if gpu else None)
    over = {"parallel.tp": args.tp, "parallel.ep": args.ep, "parallel.dp": args.dp} if "RANK" in os.environ else {}
    if args.dtype:
        over["dtype"] = args.dtype
    llm = LLM(ckpt, profile=args.profile, **over)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    logits = llm.logits(ids)
    tokens, _ = llm.generate_ids(ids, max_new_tokens=32, ignore_eos=True)
    if rank() == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = f"_dp{args.dp}" if args.dp > 1 else ""
        name = f"ws{world}_tp{args.tp}_ep{args.ep}{dp}" if "RANK" in os.environ else "single"
        torch.save({"logits": logits, "tokens": tokens}, Path(args.dir) / f"{name}.pt")
        print(f"saved {name}")


def compare(args) -> None:
    runs = {p.stem: torch.load(p) for p in sorted(Path(args.dir).glob("*.pt"))}
    base = runs.pop("single")
    lines = ["| run | max rel logit error vs single process | greedy tokens equal | first divergence |",
             "|---|---|---|---|"]
    for name, r in runs.items():
        err = float((r["logits"].double() - base["logits"].double()).abs().max() / base["logits"].double().abs().max())
        equal = sum(a == b for x, y in zip(r["tokens"], base["tokens"]) for a, b in zip(x, y))
        total = sum(len(x) for x in base["tokens"])
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                 for x, y in zip(r["tokens"], base["tokens"])]
        lines.append(f"| {name} | {err:.2e} | {equal}/{total} | {first} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def bench(args) -> None:
    from dsv3.backends.nvidia.graphs import CudaGraphRunner
    from dsv3.commands.bench import build_model
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.cache import LatentCache
    from dsv3.core.profile import load_profile, with_overrides
    from dsv3.parallel import launch
    from dsv3.plugins.manager import create_registry
    registry = create_registry()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    profile = with_overrides(load_profile("cuda-fp8"), {"parallel.tp": world, "parallel.ep": world})
    mesh, device = launch.setup(profile, registry, "cuda", torch.device("cuda"))
    t0 = time.perf_counter()
    model, cfg, _, _ = build_model(registry, "cuda", args.layers, parallel=mesh, device=device)
    torch.cuda.synchronize()
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    bs, ctx = 64, args.context
    nseq = max(max(args.batches), args.prefill_seqs)
    per_seq = -(-(max(ctx, args.prefill_len) + bs) // bs)
    cache = LatentCache(args.layers, nseq * per_seq, bs, cfg.latent_dim, torch.bfloat16, device)
    for layer in cache.layers:
        layer.normal_()
    result = {"world": world, "layers": args.layers, "weights_gb_per_rank": gb, "build_s": time.perf_counter() - t0,
              "device": torch.cuda.get_device_name(), "decode": [], "prefill": None}
    g = torch.Generator().manual_seed(1)

    def timed(fn, reps):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    def nccl_share(fn) -> float:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in p.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in kernels)
        nccl = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower())
        return nccl / total if total else 0.0

    with torch.inference_mode():
        chunks = [Chunk(torch.randint(2, cfg.vocab_size, (args.prefill_len,), generator=g).tolist(), 0,
                        list(range(s * per_seq, s * per_seq + -(-args.prefill_len // bs))))
                  for s in range(args.prefill_seqs)]
        pb = Batch.build(chunks, bs, device)
        prefill = lambda: model.logits(model(pb, cache.layers)[pb.last_rows])  # noqa: E731
        tp = timed(prefill, 3)
        result["prefill"] = {"tokens": args.prefill_seqs * args.prefill_len, "s": tp,
                             "tok_s": args.prefill_seqs * args.prefill_len / tp, "nccl_share": nccl_share(prefill)}
        batches = []
        for b in args.batches:
            chunks = [Chunk([int(torch.randint(2, cfg.vocab_size, (), generator=g))], ctx,
                            list(range(s * per_seq, s * per_seq + -(-(ctx + 1) // bs))), decode=True) for s in range(b)]
            batches.append((b, Batch.build(chunks, bs, device)))
        for b, db in batches:                       # eager first: a failed graph capture cannot spoil these
            eager = lambda: model.logits(model(db, cache.layers))  # noqa: E731
            result["decode"].append({"batch": b, "eager_ms": timed(eager, 10) * 1e3, "nccl_share_eager": nccl_share(eager)})
        runner = CudaGraphRunner(model, bs, max_context=ctx + bs)
        for (b, db), row in zip(batches, result["decode"]):
            try:
                graphed = lambda: model.logits(runner(db, cache.layers))  # noqa: E731
                row["graph_ms"] = timed(graphed, 20) * 1e3
            except Exception as e:  # noqa: BLE001 - report why capture failed; the eager numbers stand
                row["graph_ms"] = None
                row["note"] = f"graph capture failed: {type(e).__name__}: {str(e)[:160]}"
                break
            if rank() == 0:
                print(json.dumps(row), flush=True)
    if rank() == 0:
        print(json.dumps(result, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    # Tear down in order while every rank is still here: graphs that captured NCCL kernels, then the
    # communicator. Left to interpreter exit (atexit destroys the group, graphs go later), a ws2 run on
    # H200s hung after writing its results.
    runner = None                                  # frees the captured graphs now
    torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--ep", type=int, default=1)
    c.add_argument("--dp", type=int, default=1, help="data-parallel attention groups (dp x tp = world)")
    c.add_argument("--profile", default="cuda-fp8", help="cpu runs this check on gloo (a dry run of the script)")
    c.add_argument("--model", help="check this checkpoint instead of the small random one (e.g. the demo model)")
    c.add_argument("--dtype", help="activation dtype override (float32: layouts differ only by reduction order)")
    c.add_argument("--all-experts", action="store_true", help="route every token to every expert (see make_checkpoint)")
    c.add_argument("--widths-for", type=int, default=2, help="make the small model's widths split at tp = ep = this")
    m = sub.add_parser("compare")
    m.add_argument("--dir", required=True)
    m.add_argument("--out")
    b = sub.add_parser("bench")
    b.add_argument("--layers", type=int, default=10)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    b.add_argument("--context", type=int, default=1024)
    b.add_argument("--prefill-seqs", type=int, default=4)
    b.add_argument("--prefill-len", type=int, default=2048)
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    {"check": check, "compare": compare, "bench": bench}[args.mode](args)


if __name__ == "__main__":
    main()
