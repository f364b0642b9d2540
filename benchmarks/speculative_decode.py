"""MTP speculative decoding against plain decoding, at a simulated draft acceptance: per batch size and
k, ms per step, tokens per step, the speedup, the verify step's cost over a plain step's, and what the
adaptive DraftPolicy chooses. Full-width DeepSeek-V3 with random FP8 weights made on the GPU, at the
real depth (`--depth 61`: a few layers' storage shared across depth, as `dsv3-run bench` does).

    python benchmarks/speculative_decode.py --depth 61 --batches 1 8 32 --k 1 2 3 --acceptance 0.85
    python benchmarks/speculative_decode.py --tiny          # CPU smoke check: toy config, no numbers to quote

Random weights make the MTP layer's own drafts useless, so the drafter runs in full (MTP layer, its
head, the chained passes: every cost paid) but its proposal is replaced: at each draft position an
oracle draft (the token plain greedy decoding produced there) with probability `--acceptance`, else
a wrong one, from a seeded generator. Drafts are verified in order, so a draft position is reached
only past accepted ones: expected tokens per verify step (1 - a^(k+1)) / (1 - a).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from dsv3.commands.bench import DEEPSEEK_V3, build_model, depth_layout, share_depth
from dsv3.core.cache import LatentCache
from dsv3.core.engine import Engine
from dsv3.core.sampling import SamplingParams
from dsv3.core.speculative import DraftPolicy, MTPDrafter
from dsv3.plugins.manager import create_registry


def decode(engine: Engine, prompts: list[list[int]], new_tokens: int, sync) -> tuple[float, int, float, list]:
    """Of the decode phase (the prefill step excluded): seconds, engine steps, tokens per second; and
    the outputs."""
    seqs = [engine.add(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    engine.step()                                   # prefill (and, with speculation, the first drafts)
    sync()
    steps0, done0, t0 = engine.stats.steps, sum(len(s.output_ids) for s in seqs), time.perf_counter()
    engine.run_to_completion()
    sync()
    seconds = time.perf_counter() - t0
    return (seconds, engine.stats.steps - steps0, (sum(len(s.output_ids) for s in seqs) - done0) / seconds,
            [s.output_ids for s in seqs])


def simulated_drafts(truth: dict, acceptance: float, vocab: int, seed: int):
    """MTPDrafter._propose's stand-in: per draft position the true token with probability `acceptance`."""
    rng = random.Random(seed)

    def propose(work, rows, logits, j):
        tokens = []
        for seq, *_ in work:
            true = truth[tuple(seq.token_ids[: seq.prompt_len])]
            i = len(seq.output_ids) + j
            tok = true[i] if i < len(true) else 2
            tokens.append(tok if rng.random() < acceptance else (tok + 1 + rng.randrange(vocab - 1)) % vocab)
        return torch.tensor(tokens, dtype=torch.int64, device=logits.device), None
    return propose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=DEEPSEEK_V3["num_hidden_layers"],
                    help="decoder layers (default 61; storage of a few shared across depth)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--acceptance", type=float, default=0.85, help="probability a draft position is correct")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="toy config on the CPU (reference ops): a smoke check")
    args = ap.parse_args()

    registry = create_registry()
    if args.tiny:
        from dsv3.checkpoints.synthetic import TINY_CONFIG
        device, hf, config_dense, bs, runner = "cpu", TINY_CONFIG, TINY_CONFIG["first_k_dense_replace"], 16, None
        args.prompt_len, args.new_tokens = min(args.prompt_len, 24), min(args.new_tokens, 24)
    else:
        device, hf, config_dense, bs = "cuda", None, DEEPSEEK_V3["first_k_dense_replace"], 64
    dense, stored_dense, stored_moe = depth_layout(args.depth, config_dense)
    model, cfg, _, _ = build_model(registry, device if device == "cpu" else "cuda", stored_dense + stored_moe,
                                   mtp=True, device=device, dense=stored_dense, hf=hf)
    share_depth(model, args.depth, dense)
    cfg = model.cfg
    max_context = args.prompt_len + args.new_tokens + max(args.k) + 16
    cache = LatentCache(model.num_cache_layers, max(args.batches) * -(-max_context // bs), bs, cfg.latent_dim,
                        torch.bfloat16, device)
    if device == "cuda":
        from dsv3.backends.nvidia.graphs import CudaGraphRunner
        runner = CudaGraphRunner(model, bs, max_context=max_context)
        sync, where = torch.cuda.synchronize, f"{torch.cuda.get_device_name()}, CUDA graphs for decode/verify"
    else:
        sync, where = (lambda: None), "CPU, reference ops (a smoke check: these times say nothing about a GPU)"
    a = args.acceptance
    print(f"{where}; depth {args.depth} ({dense} dense + {args.depth - dense} MoE; storage of {stored_dense} dense + "
          f"{stored_moe} MoE layers shared across depth) + MTP, hidden {cfg.hidden_size}, random FP8 weights, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(f"drafts: simulated acceptance {a:.2f} per draft position (a seeded mix of oracle drafts, the plain "
          f"greedy token, and wrong ones; the MTP layer and head still run in full)")

    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for b in args.batches:
        prompts = [torch.randint(2, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        plain = Engine(model, cache, None, 8192, runner, prefix_caching=False)
        # warm-up (graphs, compiles) that also gives the oracle its truth: max(k) tokens past the
        # compared length, so the last verify step's drafts can be right too
        *_, longer = decode(plain, prompts, args.new_tokens + max(args.k), sync)
        seconds, steps, plain_rate, want = decode(plain, prompts, args.new_tokens, sync)
        plain_step = seconds / steps
        truth = {tuple(p): t for p, t in zip(prompts, longer)}
        rows.append((b, "plain", plain_step, 1.0, 1.0, 1.0, "yes", ""))
        for k in args.k:
            original = MTPDrafter.__dict__["_propose"]               # the staticmethod itself
            MTPDrafter._propose = staticmethod(simulated_drafts(truth, a, cfg.vocab_size, args.seed + k))
            try:
                spec = Engine(model, cache, None, 8192, runner, num_draft_tokens=k, prefix_caching=False,
                              draft_policy="always")
                decode(spec, prompts, 8, sync)                                  # capture the verify shapes
                spec.stats = type(spec.stats)()
                seconds, steps, rate, got = decode(spec, prompts, args.new_tokens, sync)
                step, per_step = seconds / steps, spec.stats.spec.mean_accepted_length
                # the adaptive policy: one run to learn, the next measured
                policy = DraftPolicy(k)
                adaptive = Engine(model, cache, None, 8192, runner, num_draft_tokens=k, prefix_caching=False,
                                  draft_policy=policy)
                decode(adaptive, prompts, args.new_tokens, sync)
                *_, a_rate, a_got = decode(adaptive, prompts, args.new_tokens, sync)
            finally:
                MTPDrafter._propose = original
            gain = policy.gain(b)
            choice = (f"{'drafts' if policy.drafting else 'plain'} (gain {gain:.2f}), "
                      f"{a_rate / plain_rate:.2f}x" if gain is not None else f"untimed, {a_rate / plain_rate:.2f}x")
            same = "yes" if got == want and a_got == want else "NO"
            rows.append((b, f"MTP k={k}", step, per_step, rate / plain_rate, step / plain_step, same, choice))
    print(f"\n| batch | decoding | ms/step | tokens/step (per sequence) | speedup vs plain | step time / plain step "
          f"| output == plain greedy | adaptive policy: choice, measured speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for b, name, step, per_step, speedup, ratio, same, choice in rows:
        print(f"| {b} | {name} | {step * 1e3:.2f} | {per_step:.2f} | {speedup:.2f}x | {ratio:.2f} | {same} | {choice} |")
    print(f"\nexpected tokens/step at acceptance {a:.2f}: " + ", ".join(
        f"k={k} {(1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1:.2f}" for k in args.k)
        + "; MTP rows draft every step (policy always); speedup = tokens per second over plain decoding's")


if __name__ == "__main__":
    main()
