"""Time `mla_decode` launch configurations on the GPU at DeepSeek-V3 shapes (128 heads, latent 512 +
rope 64, 64-token pages), after checking each against the reference on fresh random data.

    python benchmarks/mla_decode_sweep.py [--batch 64 --context 4096]

Prints one row per (cache dtype, config): time, cache GB/s (bytes read once / time), TFLOP/s, and the
relative error at a small shape. The tuning table (dsv3/backends/triton/tuning.py) takes the winner.
"""
import argparse

import torch
import triton

from dsv3.backends.reference import ops as ref
from dsv3.backends.triton import mla
from dsv3.backends.triton.tuning import AttnConfig, Target

# (heads per program, keys per step, warps, pipeline stages)
CONFIGS = [(64, 64, 8, 2), (64, 64, 8, 1), (64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (32, 32, 4, 2),
           (16, 64, 4, 2)]


def paged(b, ctx, cdt, dev, bs=64):
    nb = b * triton.cdiv(ctx, bs)
    cache = torch.randn(nb, bs, 576, device=dev, dtype=torch.bfloat16).to(cdt)
    table = torch.randperm(nb, device=dev, dtype=torch.int32).view(b, -1)
    return cache, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    target = Target("cuda", torch.float8_e4m3fn, torch.cuda.get_device_properties(0).multi_processor_count)
    b, ctx = args.batch, args.context
    for cdt in (bf, torch.float8_e4m3fn):
        cache, table = paged(b, ctx, cdt, dev)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        ql, qr = torch.randn(b, 128, 512, device=dev, dtype=bf), torch.randn(b, 128, 64, device=dev, dtype=bf)
        nbytes = cache.numel() * cache.element_size()
        flops = 2 * b * 128 * ctx * (576 + 512)
        # correctness shape: ragged contexts (1 .. 3000), shuffled pages, fresh data per config
        small_lens = torch.tensor([1, 63, 64, 65, 700, 3000], dtype=torch.int32, device=dev)
        for bh, bn, w, st in CONFIGS:
            cfg = AttnConfig(bh, bn, w, st)
            for split_waves in ((1, 2, 4) if (bh, bn, w, st) == CONFIGS[0] else (2,)):
                heads_blocks = 128 // bh
                splits = max(1, min(64, triton.cdiv(split_waves * target.num_sms, b * heads_blocks)))
                try:
                    sc, st_ = paged(6, 3000, cdt, dev)
                    sq, sr = torch.randn(6, 128, 512, device=dev, dtype=bf), torch.randn(6, 128, 64, device=dev, dtype=bf)
                    got = mla.mla_decode(target, sq, sr, sc, st_, small_lens, 0.07, cfg=cfg)
                    want = ref.mla_decode(sq.float(), sr.float(), sc.float(), st_, small_lens, 0.07)
                    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                    fn = lambda: mla.mla_decode(target, ql, qr, cache, table, lens, 0.07, cfg=cfg, splits=splits)  # noqa: E731
                    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                    print(f"{str(cdt).split('.')[-1]:<14} BH={bh:<3} BN={bn:<3} warps={w:<2} stages={st} splits={splits:<3} "
                          f"{ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s  {flops / ms / 1e9:6.0f} TFLOP/s  "
                          f"rel err {err:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001 - a config that does not build is reported, not fatal
                    print(f"{str(cdt).split('.')[-1]:<14} BH={bh} BN={bn} warps={w} stages={st}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        del cache


if __name__ == "__main__":
    main()
