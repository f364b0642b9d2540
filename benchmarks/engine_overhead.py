"""Engine throughput on the CPU with the embedded demo model: decode tokens/s at batch 1, 8 and 64,
greedy and sampled, the best of a few repeats. On two cores the demo model's step is small, so what
this shows is mostly the engine's own per-step cost (scheduling, batch building, sampling, post-
processing) around the reference ops.

    python benchmarks/engine_overhead.py [--batches 1,8,64] [--new-tokens 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dsv3 import LLM
    llm = LLM(backend="cpu")
    vocab = llm.config.vocab_size
    rng = random.Random(0)
    print(f"| batch | sampling | tok/s (best of {args.repeats}) | ms per step |")
    print("| ---: | --- | ---: | ---: |")
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(b)]
        llm.generate_ids(prompts, max_new_tokens=2, ignore_eos=True)          # first calls
        for label, kw in (("greedy", {}), ("T=0.8 top-p 0.95", {"temperature": 0.8, "top_p": 0.95, "seed": 1})):
            best = None
            for _ in range(args.repeats):
                steps = llm.engine.stats.steps
                t0 = time.perf_counter()
                llm.generate_ids(prompts, max_new_tokens=args.new_tokens, ignore_eos=True, **kw)
                dt = time.perf_counter() - t0
                n = llm.engine.stats.steps - steps
                best = min(best or (dt, n), (dt, n))
            dt, n = best
            print(f"| {b} | {label} | {b * args.new_tokens / dt:.1f} | {1000 * dt / n:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
