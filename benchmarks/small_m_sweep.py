"""Small-M (decode) launch parameters of the FP8 GEMM, and the MoE gate, on the GPU at hand.

    python benchmarks/small_m_sweep.py [--m 1,16] [--out sweep.json]

For every DeepSeek-V3 GEMM shape and M: the time of the tuning table's choice and of each candidate
(column tile, split count by programs in flight, pipeline depth), against the weight-read floor
(bytes over the streaming read bandwidth measured here); weights rotate over copies to defeat L2.
Then moe_gate at decode token counts (CUDA graph of 20 calls), checked against the reference.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from dsv3.backends.nvidia.ops import cuda_target
from dsv3.backends.reference import ops as ref
from dsv3.backends.triton import gate, gemm, tuning
from dsv3.commands.bench import GEMM_SHAPES, L2_DEFEAT_BYTES, _random_fp8_weight, time_calls, time_events
from dsv3.core.ops import GateSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--out")
    ap.add_argument("--gate-only", action="store_true", help="skip the GEMM sweep")
    args = ap.parse_args()
    target = cuda_target()
    x = torch.empty(1 << 30, device="cuda").normal_()
    read_bw = x.numel() * 4 / time_events(lambda: x.sum())
    del x
    print(f"streaming read {read_bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name, n, k in [] if args.gate_only else GEMM_SHAPES:
        copies = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (n * k))))
        ws = _random_fp8_weight(n, k, "cuda", copies)
        k_steps = triton.cdiv(k, 128)
        for m in (int(v) for v in args.m.split(",")):
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            floor = (n * k + n * k / 16384 * 4 + 2 * m * k + 2 * m * n) / read_bw

            def timed(cfg):
                return time_calls([lambda w=w: gemm.fp8_gemm(a, None, w.data, w.scale, torch.bfloat16, cfg)
                                   for w in ws])[0]
            default = tuning.gemm_config(target, m, n, k)
            t_default = timed(default)
            cands = []
            for bn in (32, 64, 128):
                tiles = triton.cdiv(n, bn)
                for programs in (132, 264, 528, 1056):
                    split = max(1, min(triton.cdiv(programs, tiles), k_steps))
                    for stages in (3, 5):
                        cfg = tuning.GemmConfig(16, bn, split, 1, 4, stages)
                        if any(c[1] == cfg for c in cands):
                            continue
                        cands.append((timed(cfg), cfg))
            cands.sort(key=lambda c: c[0])
            best = cands[0]
            row = {"gemm": name, "m": m, "n": n, "k": k, "floor_us": floor * 1e6, "default_us": t_default * 1e6,
                   "default": [default.block_n, default.split_k, default.num_stages],
                   "best_us": best[0] * 1e6, "best": [best[1].block_n, best[1].split_k, best[1].num_stages],
                   "top": [[round(t * 1e6, 2), c.block_n, c.split_k, c.num_stages] for t, c in cands[:6]]}
            rows.append(row)
            print(f"{name:15s} M={m:<3d} floor {floor * 1e6:6.1f} us  default {t_default * 1e6:6.1f} "
                  f"({t_default / floor:.2f}x, bn/split/stages {row['default']})  best {best[0] * 1e6:6.1f} "
                  f"({best[0] / floor:.2f}x, {row['best']})  next {row['top'][1:4]}", flush=True)
        del ws
        torch.cuda.empty_cache()
    spec = GateSpec(8, 8, 4, True, 2.5)
    gw = torch.randn(256, 7168, device="cuda", dtype=torch.bfloat16) * 0.02
    gb = torch.randn(256, device="cuda") * 0.01
    gates = []
    for t in (1, 2, 8, 16, 64, 256, 4096):
        xs = [torch.randn(t, 7168, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        tt = time_calls([lambda x=x: gate.moe_gate(x, gw, gb, spec, target.num_sms) for x in xs])[0]
        w, i = gate.moe_gate(xs[0], gw, gb, spec, target.num_sms)
        rw, ri = ref.moe_gate(xs[0], gw, gb, spec)
        same = (i.sort(-1).values == ri.sort(-1).values).all(-1).float().mean().item()
        again = torch.equal(gate.moe_gate(xs[0], gw, gb, spec, target.num_sms)[1], i)
        gates.append({"t": t, "us": tt * 1e6, "same_ids": same, "deterministic": again})
        print(f"moe_gate T={t:<5d} {tt * 1e6:7.2f} us  ids equal to reference on {same * 100:.1f}% of tokens, "
              f"repeat identical: {again}", flush=True)
    # gate variants: warps per program and the cap on D splits (the router reads every split's partials)
    default_config = gate.gate_config
    variants = []
    for t in (1, 8, 64):
        xs = [torch.randn(t, 7168, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        bt, be, bd, _, rt, _ = default_config(t, 256, 7168, target.num_sms)
        for warps in (1, 2, 4):
            for cap in ((4, 8) if t == 1 else (2, 4)):
                splits = max(1, min(triton.cdiv(2 * target.num_sms, triton.cdiv(t, bt) * 16), cap))
                gate.gate_config = lambda *_, c=(bt, be, bd, splits, rt, warps): c
                try:
                    tt = time_calls([lambda x=x: gate.moe_gate(x, gw, gb, spec, target.num_sms) for x in xs])[0]
                    same = min((gate.moe_gate(x, gw, gb, spec, target.num_sms)[1].sort(-1).values ==
                                ref.moe_gate(x, gw, gb, spec)[1].sort(-1).values).all(-1).float().mean().item()
                               for x in xs)
                finally:
                    gate.gate_config = default_config
                variants.append({"t": t, "warps": warps, "splits": splits, "us": tt * 1e6, "same_ids": same})
                print(f"moe_gate variant T={t:<3d} warps {warps} splits {splits}: {tt * 1e6:6.2f} us, ids equal on "
                      f"{same * 100:.0f}%", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"read_bw": read_bw, "gemm": rows, "gate": gates, "gate_variants": variants}, f, indent=1)


if __name__ == "__main__":
    main()
