"""Issue 16: where a one-row FP8 GEMM's time goes, and what programmatic dependent launch changes.

    python benchmarks/pdl_gemv_probe.py            # the table below
    python benchmarks/pdl_gemv_probe.py --ncu q_a  # one launch of that shape for `ncu -k regex:fp8_gemm`

For each DeepSeek-V3 GEMM shape at M = 1 (the op as dispatched: Triton split-K, activation quantised
inside), a CUDA graph of 20 calls rotating over weight copies (beyond L2), timed three ways: plain
launches; PDL with the L2 weight prefetch; PDL without it. Then a layer-like chain (add_rms_norm ->
q_a -> kv_a -> rms_norm -> q_b -> o_proj -> add_rms_norm -> shared gate/up -> shared down) the same
three ways. Floors: weight bytes over the streaming read bandwidth measured here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from dsv3.backends.nvidia.ops import cuda_target
from dsv3.backends.triton import gemm, norm
from dsv3.backends.triton.ops import triton_linear
from dsv3.commands.bench import GEMM_SHAPES, L2_DEFEAT_BYTES, _random_fp8_weight, time_calls, time_events

SHAPES = {name: (n, k) for name, n, k in GEMM_SHAPES}
PREFETCH_RULE = gemm.gemm_prefetch_steps


def variants(target):
    """(label, target, prefetch rule) for plain, PDL + prefetch, PDL alone."""
    return [("plain", replace(target, pdl=False), PREFETCH_RULE), ("pdl+prefetch", replace(target, pdl=True), PREFETCH_RULE),
            ("pdl", replace(target, pdl=True), lambda *a: 0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", help="one shape: launch it 3 times (for ncu) and exit")
    args = ap.parse_args()
    target = cuda_target()
    if args.ncu:
        n, k = SHAPES[args.ncu]
        w = _random_fp8_weight(n, k, "cuda")[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            triton_linear(replace(target, pdl=False), x, w)
        torch.cuda.synchronize()
        return
    x = torch.empty(1 << 30, device="cuda").normal_()
    read_bw = x.numel() * 4 / time_events(lambda: x.sum())
    del x
    print(f"{torch.cuda.get_device_name()}, streaming read {read_bw / 1e12:.2f} TB/s; M = 1, CUDA graph of 20 calls")
    print("| GEMM | floor us | " + " | ".join(f"{v[0]} us (x floor)" for v in variants(target)) + " |")
    print("|---|---|" + "---|" * 3)
    weights = {}
    for name, (n, k) in SHAPES.items():
        copies = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (n * k))))
        ws = weights[name] = _random_fp8_weight(n, k, "cuda", copies)
        a = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        floor = (n * k * (1 + 4 / 16384)) / read_bw
        cells = []
        for _, t, rule in variants(target):
            gemm.gemm_prefetch_steps = rule
            s = time_calls([lambda w=w, t=t: triton_linear(t, a, w) for w in ws])[0]
            cells.append(f"{s * 1e6:.1f} ({s / floor:.2f})")
        gemm.gemm_prefetch_steps = PREFETCH_RULE
        print(f"| {name} | {floor * 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)
    # a layer-like chain, weights rotating over copies
    chain_names = ["q_a", "kv_a", "q_b", "o_proj", "shared gate/up", "shared down"]
    nw = torch.rand(7168, device="cuda", dtype=torch.bfloat16) + 0.5
    nq = torch.rand(1536, device="cuda", dtype=torch.bfloat16) + 0.5
    floor = sum(SHAPES[c][0] * SHAPES[c][1] for c in chain_names) / read_bw

    def layer(t, i, x):
        p = t.pdl

        def w(name):                       # layer i's copy of that weight
            return weights[name][i % len(weights[name])]
        h, res = norm.add_rms_norm(x, x, nw, 1e-6, launch_pdl=p)
        qa = triton_linear(t, h, w("q_a"))
        triton_linear(t, h, w("kv_a"))
        q = triton_linear(t, norm.rms_norm(qa, nq, 1e-6, launch_pdl=p), w("q_b"))
        o = triton_linear(t, q[:, :16384], w("o_proj"))
        h, res = norm.add_rms_norm(o, res, nw, 1e-6, launch_pdl=p)
        g = triton_linear(t, h, w("shared gate/up"))
        return triton_linear(t, torch.cat([g, g], -1)[:, :2048], w("shared down"))

    x0 = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)
    print(f"\nlayer-like chain ({' -> '.join(chain_names)}, norms between), floor {floor * 1e6:.1f} us per layer")
    for label, t, rule in variants(target):
        gemm.gemm_prefetch_steps = rule
        s = time_calls([lambda i=i, t=t: layer(t, i, x0) for i in range(8)], calls=16)[0]
        print(f"  {label:<13} {s * 1e6:7.1f} us per layer ({s / floor:.2f}x floor)", flush=True)
    gemm.gemm_prefetch_steps = PREFETCH_RULE


if __name__ == "__main__":
    main()
