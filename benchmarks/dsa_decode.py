"""DeepSeek-V3.2 sparse decode (DSA) on one GPU, beside dense MLA at the same context: issue 22's speed rows.

    python benchmarks/dsa_decode.py                                   # contexts 32k and 128k, about 2-3 minutes
    python benchmarks/dsa_decode.py --contexts 32768,131072 --batches 1,8 --e2e-batches 1,4 --out FILE

1. Attention of one layer, per decode step: V3's dense `mla_decode` over the whole context, and V3.2's
   `index_scores` + `index_topk` + `sparse_mla` (with torch.topk beside our top-k as the library
   baseline), on a bf16 cache whose rows hold 576 latent values + V3.2's 128-value indexer key. Floors are
   bytes over the streaming read measured in the same run: dense reads B*L*576*2 bytes; sparse must read
   the indexer keys (B*L*128*2) and the chosen rows (B*min(2048, L)*576*2). The [B, L] fp32 scores that
   index_scores writes and index_topk reads back are not in the floor (a fused scorer + selector would not
   need them): the ratio shows what they cost.
2. Decode steps end to end at depth 61 (`dsv3-run bench`'s model: full width, random FP8 weights, storage
   of 1 dense + 2 MoE layers shared across depth, CUDA graphs), V3.2 beside V3 at the same contexts. Floor =
   the weights the step touches + its cache reads (V3: every cached latent; V3.2: indexer keys + chosen
   rows) over the read bandwidth.

Needs a CUDA GPU and the cuda backend (Triton). Prints markdown tables; --out writes them to a file.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from dsv3.commands.bench import (DEEPSEEK_V3, Table, build_model, depth_layout, measure_ceilings, share_depth,
                                 step_bytes, time_calls)

V32_INDEXER = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
DEEPSEEK_V32 = {**DEEPSEEK_V3, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", **V32_INDEXER}
C, R, DI, HI, TOPK, HEADS, BS = 512, 64, 128, 64, 2048, 128, 64


def paged_cache(batch: int, context: int, width: int):
    per_seq = -(-(context + 1) // BS)
    cache = torch.randn(batch * per_seq, BS, width, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq)
    return cache, table


def attention_table(ops, ceil, contexts, batches) -> Table:
    tab = Table(f"Attention of one layer per decode step (bf16 cache, 128 heads, index top-{TOPK}; floor = bytes / "
                f"streaming read {ceil.read / 1e12:.2f} TB/s)",
                ["context", "batch", "op", "us", "floor us", "x floor", "bytes counted"])
    scale = (128 + R) ** -0.5
    for L in contexts:
        for b in batches:
            lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
            q_lat = torch.randn(b, HEADS, C, device="cuda", dtype=torch.bfloat16)
            q_rope = torch.randn(b, HEADS, R, device="cuda", dtype=torch.bfloat16)
            dense_cache, dense_table = paged_cache(b, L, C + R)
            t_dense, _ = time_calls([lambda: ops.mla_decode(q_lat, q_rope, dense_cache, dense_table, lens, scale)])
            dense_bytes = b * L * (C + R) * 2
            tab.add(L, b, "dense mla_decode (V3)", f"{t_dense * 1e6:.1f}", f"{dense_bytes / ceil.read * 1e6:.1f}",
                    t_dense / (dense_bytes / ceil.read), f"{dense_bytes / 1e6:.1f} MB latents")
            del dense_cache
            cache, table = paged_cache(b, L, C + R + DI)
            q_idx = torch.randn(b, HI, DI, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(b, HI, device="cuda") * (HI * DI) ** -0.5
            scores = ops.index_scores(q_idx, w, cache, table, lens)
            slots = ops.index_topk(scores, table, TOPK)
            k = min(TOPK, L)
            t_scores, _ = time_calls([lambda: ops.index_scores(q_idx, w, cache, table, lens)])
            t_topk, _ = time_calls([lambda: ops.index_topk(scores, table, TOPK)])
            t_torch_topk, _ = time_calls([lambda: scores.topk(k, dim=-1)])
            t_attn, _ = time_calls([lambda: ops.sparse_mla(q_lat, q_rope, cache, slots, scale)])
            key_bytes, row_bytes = b * L * DI * 2, b * k * (C + R) * 2
            score_bytes = b * scores.shape[1] * 4
            for name, t, nbytes, what in (
                    ("index_scores", t_scores, key_bytes, f"{key_bytes / 1e6:.1f} MB indexer keys (+{score_bytes / 1e6:.1f} "
                                                          f"MB scores written, not in the floor)"),
                    ("index_topk (ours)", t_topk, 0, f"radix select: reads the {score_bytes / 1e6:.1f} MB scores 5 times"),
                    ("torch.topk (baseline)", t_torch_topk, 0, "library radix select on the same scores"),
                    ("sparse_mla", t_attn, row_bytes, f"{row_bytes / 1e6:.1f} MB chosen rows")):
                tab.add(L, b, name, f"{t * 1e6:.1f}", f"{nbytes / ceil.read * 1e6:.1f}" if nbytes else "-",
                        t / (nbytes / ceil.read) if nbytes else "-", what)
            total, floor = t_scores + t_topk + t_attn, (key_bytes + row_bytes) / ceil.read
            tab.add(L, b, "DSA total (V3.2)", f"{total * 1e6:.1f}", f"{floor * 1e6:.1f}", total / floor,
                    f"dense mla_decode takes {t_dense / total:.2f}x as long")
            del cache, scores, slots
            torch.cuda.empty_cache()
    return tab


def e2e_rows(tab, registry, ceil, hf, label, depth, contexts, batches):
    from dsv3.backends.nvidia.graphs import CudaGraphRunner
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.cache import LatentCache
    dense, stored_dense, stored_moe = depth_layout(depth, hf["first_k_dense_replace"])
    model, cfg, ops, dataclasses = build_model(registry, "cuda", stored_dense + stored_moe, dense=stored_dense, hf=hf)
    share_depth(model, depth, dense)
    cfg = model.cfg
    for L in contexts:
        for b in batches:
            per_seq = -(-(L + 1) // BS)
            try:
                cache = LatentCache(depth, b * per_seq, BS, cfg.cache_dim, torch.bfloat16, "cuda")
            except torch.OutOfMemoryError:
                tab.add(label, L, b, "-", "-", "-", "-", "cache does not fit next to the weights")
                continue
            for layer in cache.layers:
                layer.normal_()
            chunks = [Chunk([int(torch.randint(2, cfg.vocab_size, ()))], L, list(range(s * per_seq, (s + 1) * per_seq)),
                            decode=True) for s in range(b)]
            batch = Batch.build(chunks, BS, "cuda")
            touched = []

            def counting(x, w, ids, ex, _inner=ops.moe_experts):
                touched.append(int(torch.unique(ids).numel()))
                return _inner(x, w, ids, ex)
            with torch.inference_mode():
                model.set_ops(dataclasses.replace(ops, moe_experts=counting))
                model(batch, cache.layers)
                model.set_ops(ops)
            runner = CudaGraphRunner(model, BS, max_context=L + BS, buckets=(b,))

            def step():
                with torch.inference_mode():
                    return model.logits(runner(batch, cache.layers))
            try:
                t, _ = time_calls([step], calls=1, reps=10, graph=False)
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                tab.add(label, L, b, "-", "-", "-", "-", f"failed: {type(e).__name__}: {str(e)[:200]}")
                del cache, runner, batch
                torch.cuda.empty_cache()
                continue
            nb = step_bytes(model, touched, b, 0)
            if cfg.sparse_attention:
                cache_bytes = depth * b * (L * cfg.index_head_dim + min(cfg.index_topk, L + 1) * cfg.latent_dim) * 2
            else:
                cache_bytes = depth * b * (L + 1) * cfg.latent_dim * 2
            floor = (nb["weights"] + cache_bytes) / ceil.read
            tab.add(label, L, b, f"{t * 1e3:.2f}", f"{floor * 1e3:.2f}", t / floor,
                    f"{(nb['weights'] + cache_bytes) / 1e9:.1f}", f"{cache_bytes / 1e9:.2f} GB cache read; "
                    f"graph replays {runner.replays}")
            del cache, runner, batch
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--batches", default="1,8", help="decode batches of the attention table")
    p.add_argument("--e2e-batches", default="1", help="decode batches end to end ('' skips the end-to-end table)")
    p.add_argument("--depth", type=int, default=61)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("dsa_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    from dsv3.plugins.manager import create_registry, resolve_ops
    registry = create_registry()
    ops = resolve_ops(registry, "cuda")
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"dsa_decode on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ceil = measure_ceilings()
    print(ceil.line(), flush=True)
    tables = []

    def save():   # after every table, so a run cut short by a timeout keeps what it measured
        text = "\n".join(t.markdown() for t in tables)
        if args.out:
            with open(args.out, "w") as f:
                f.write(f"dsa_decode on {torch.cuda.get_device_name()}\n{ceil.line()}\n\n{text}")
        return text

    t0 = time.perf_counter()
    tables.append(attention_table(ops, ceil, contexts, [int(b) for b in args.batches.split(",")]))
    save()
    print(f"  attention table in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.e2e_batches:
        tab = Table(f"Decode steps end to end at depth {args.depth} (shared storage, random FP8 weights, bf16 cache, "
                    f"CUDA graphs); floor = weights touched + cache read / {ceil.read / 1e12:.2f} TB/s",
                    ["model", "context", "batch", "ms", "floor ms", "x floor", "GB read", "notes"])
        tables.append(tab)
        for hf, label in ((DEEPSEEK_V32, "V3.2 (DSA)"), (DEEPSEEK_V3, "V3 (dense MLA)")):
            e2e_rows(tab, registry, ceil, hf, label, args.depth, contexts, [int(b) for b in args.e2e_batches.split(",")])
            save()
            print(f"  {label} end to end done at {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n" + save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
