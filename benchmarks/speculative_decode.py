"""MTP speculative decoding on the GPU: tokens/s of plain decoding beside speculation whose drafts are
always accepted (the ceiling) and never accepted (the overhead), on full-width DeepSeek-V3 with reduced
depth and random FP8 weights generated on the GPU.

    python benchmarks/speculative_decode.py --layers 4 --batches 1 8 --k 1 2 --new-tokens 64

Random weights make the MTP layer's own drafts useless, so the drafter still runs (its cost is paid in
full) but its proposal is replaced: "oracle" proposes the token plain greedy decoding produced at that
position, "never" proposes a token that differs from it. Real acceptance needs trained weights.
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv3.commands.bench import build_model
from dsv3.core.cache import LatentCache
from dsv3.core.engine import Engine
from dsv3.core.sampling import SamplingParams
from dsv3.core.speculative import MTPDrafter
from dsv3.plugins.manager import create_registry


def decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Generated tokens per second over the decode phase (the prefill step is excluded)."""
    engine.stats = type(engine.stats)()
    seqs = [engine.add(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    engine.step()                                   # prefill (and, with speculation, the first drafts)
    torch.cuda.synchronize()
    done0 = sum(len(s.output_ids) for s in seqs)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return (sum(len(s.output_ids) for s in seqs) - done0) / dt, [s.output_ids for s in seqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    from dsv3.backends.nvidia.graphs import CudaGraphRunner
    registry = create_registry()
    model, cfg, _, _ = build_model(registry, "cuda", args.layers, mtp=True)
    bs = 64
    cache = LatentCache(model.num_cache_layers, max(args.batches) * (-(-(args.prompt_len + args.new_tokens + 16) // bs)),
                        bs, cfg.latent_dim, torch.bfloat16, "cuda")
    runner = CudaGraphRunner(model, bs, max_context=args.prompt_len + args.new_tokens + 16)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"device {torch.cuda.get_device_name()}, {args.layers} layers + MTP, full width, random FP8 weights, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, CUDA graphs for decode/verify")
    for b in args.batches:
        prompts = [torch.randint(2, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        plain = Engine(model, cache, None, 8192, runner, prefix_caching=False)
        # warm-up (capture graphs, compile) that also gives the oracle its truth: max(k) tokens past the
        # compared length, so the last verify step's drafts are right too (a fallback token there made
        # k=2 read 32/11 = 2.91 tokens per step at 32 new tokens)
        _, longer = decode_rate(plain, prompts, args.new_tokens + max(args.k))
        base, truth = decode_rate(plain, prompts, args.new_tokens)
        if truth != [t[: args.new_tokens] for t in longer]:
            print(f"warning: batch {b}: two plain greedy runs disagree (nondeterministic decode?)")
        rows.append((b, "plain", "-", base, 1.0, "-"))
        reference = {tuple(p): t for p, t in zip(prompts, longer)}
        for k in args.k:
            for mode in ("oracle", "never"):
                def propose(work, sampling_rows, logits, j, mode=mode):   # MTPDrafter._propose's signature
                    tokens = []
                    for seq, *_ in work:
                        true = reference[tuple(seq.token_ids[: seq.prompt_len])]
                        i = len(seq.output_ids) + j
                        tok = true[i] if i < len(true) else 2
                        tokens.append(tok if mode == "oracle" else (tok + 1) % cfg.vocab_size)
                    return torch.tensor(tokens, dtype=torch.int64, device=logits.device), None
                original = MTPDrafter.__dict__["_propose"]               # the staticmethod itself
                MTPDrafter._propose = staticmethod(propose)
                try:
                    spec = Engine(model, cache, None, 8192, runner, num_draft_tokens=k, prefix_caching=False)
                    decode_rate(spec, prompts, 4)
                    rate, out = decode_rate(spec, prompts, args.new_tokens)
                finally:
                    MTPDrafter._propose = original
                same = out == truth
                stats = spec.stats.spec
                rows.append((b, f"MTP k={k}, drafts {mode}", f"{stats.mean_accepted_length:.2f}", rate, rate / base,
                             "yes" if same else "NO"))
    print("\n| batch | decoding | tokens per verify step | tok/s | vs plain | output == plain greedy |")
    print("|---|---|---|---|---|---|")
    for b, name, length, rate, ratio, same in rows:
        print(f"| {b} | {name} | {length} | {rate:.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
