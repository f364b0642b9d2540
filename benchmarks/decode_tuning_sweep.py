"""Issue 16: launch parameters of the fused MoE and of mla_decode at decode batch sizes, on the GPU at hand.

    python benchmarks/decode_tuning_sweep.py [--out sweep.md]

MoE (T = 1 and 8 tokens, routed by the gate, all 256 experts stored): every (down-projection column tile,
pipeline depth, warps) candidate, each a CUDA graph of 20 calls, against the bytes of the experts touched over
the streaming read bandwidth; outputs checked against the tuning table's. mla_decode (batch 1 and 8, contexts
1024 and 4096, bf16 cache): every KV split count, rotating over cache copies beyond L2 (each layer reads its
own cache), against the cache bytes' floor. The tuning table's own choice is marked `*`.
"""
from __future__ import annotations

import argparse
import math

import torch
import triton

from dsv3.backends.nvidia.ops import cuda_target
from dsv3.backends.triton import mla, moe, tuning
from dsv3.commands.bench import _random_fp8_experts, time_calls, time_events
from dsv3.core.ops import GateSpec

D, INTER, E = 7168, 2048, 256


def sweep_moe(target, read_bw, out):
    from dsv3.backends.triton.ops import make_ops
    dev = "cuda"
    ops = make_ops(target)
    experts = _random_fp8_experts(E, D, INTER, dev)
    spec = GateSpec(8, 8, 4, True, 2.5)
    gw, gb = torch.randn(E, D, device=dev, dtype=torch.bfloat16) * 0.02, torch.randn(E, device=dev) * 0.01
    rule = moe.moe_config
    for t in (1, 8):
        x = torch.randn(t, D, device=dev, dtype=torch.bfloat16)
        wts, ids = ops["moe_gate"](x, gw, gb, spec)
        touched = int(torch.unique(ids).numel())
        floor = (touched * 3 * INTER * D) / read_bw
        base_cfg = rule(target, t * 8, E)
        want = moe.moe_experts(target, x, wts, ids, experts)
        rows = []
        for bn in (32, 64, 128, 256):
            for stages in (3, 4, 5):
                for warps in (4, 8):
                    cfg = tuning.MoeConfig(base_cfg.block_m, 128, bn, warps, stages)
                    moe.moe_config = lambda *a, cfg=cfg: cfg
                    try:
                        got = moe.moe_experts(target, x, wts, ids, experts)
                        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                        s = time_calls([lambda: moe.moe_experts(target, x, wts, ids, experts)])[0]
                        rows.append((s, cfg, err))
                    except Exception as e:  # noqa: BLE001 - a config that does not build is reported
                        print(f"  T={t} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                    finally:
                        moe.moe_config = rule
        rows.sort(key=lambda r: r[0])
        out.append(f"\n### moe_experts T={t} ({touched} experts touched), floor {floor * 1e6:.1f} us; "
                   f"table: block_m {base_cfg.block_m}, down tile {base_cfg.block_n_down}, warps {base_cfg.num_warps}, "
                   f"stages {base_cfg.num_stages}\n\n| us | x floor | down tile | warps | stages | rel diff vs table |\n"
                   "|---|---|---|---|---|---|")
        for s, cfg, err in rows:
            mark = " *" if (cfg.block_n_down, cfg.num_warps, cfg.num_stages) == (
                base_cfg.block_n_down, base_cfg.num_warps, base_cfg.num_stages) else ""
            out.append(f"| {s * 1e6:.1f}{mark} | {s / floor:.2f} | {cfg.block_n_down} | {cfg.num_warps} | "
                       f"{cfg.num_stages} | {err:.1e} |")
        print("\n".join(out[-len(rows) - 4:]), flush=True)
    del experts


def sweep_mla(target, read_bw, out):
    dev, bf = "cuda", torch.bfloat16
    for b in (1, 8):
        for ctx in (1024, 4096):
            per = b * ctx * 576 * 2
            copies = max(2, math.ceil((256 << 20) / per))
            nb = b * triton.cdiv(ctx, 64)
            caches = [torch.randn(nb, 64, 576, device=dev, dtype=bf) for _ in range(copies)]
            table = torch.randperm(nb, device=dev, dtype=torch.int32).view(b, -1)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
            ql, qr = torch.randn(b, 128, 512, device=dev, dtype=bf), torch.randn(b, 128, 64, device=dev, dtype=bf)
            cfg = tuning.mla_decode_config(target, 128, bf)
            chosen = tuning.mla_decode_splits(target, b, 128 // cfg.block_h, table.shape[1] * 64, cfg.block_n)
            floor = per / read_bw
            want = mla.mla_decode(target, ql, qr, caches[0], table, lens, 0.07)
            out.append(f"\n### mla_decode B={b} ctx={ctx} bf16, floor {floor * 1e6:.2f} us ({copies} cache copies "
                       f"rotated)\n\n| splits | us | x floor | rel diff vs table |\n|---|---|---|---|")
            for splits in (1, 2, 4, 8, 16, 32, 64):
                got = mla.mla_decode(target, ql, qr, caches[0], table, lens, 0.07, splits=splits)
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                s = time_calls([lambda c=c: mla.mla_decode(target, ql, qr, c, table, lens, 0.07, splits=splits)
                                for c in caches], calls=max(20, copies))[0]
                out.append(f"| {splits}{' *' if splits == chosen else ''} | {s * 1e6:.1f} | {s / floor:.2f} | {err:.1e} |")
            print("\n".join(out[-9:]), flush=True)
            del caches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", choices=("moe", "mla"))
    args = ap.parse_args()
    target = cuda_target()
    x = torch.empty(1 << 30, device="cuda").normal_()
    read_bw = x.numel() * 4 / time_events(lambda: x.sum())
    del x
    out = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
           f"streaming read {read_bw / 1e12:.2f} TB/s; PDL {'on' if target.pdl else 'off'}"]
    print(out[0], flush=True)
    if args.only in (None, "mla"):
        sweep_mla(target, read_bw, out)
    if args.only in (None, "moe"):
        sweep_moe(target, read_bw, out)
    if args.out:
        open(args.out, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
