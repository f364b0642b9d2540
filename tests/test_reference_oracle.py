"""The reference ops against oracles that share none of their code.

`dsv3/backends/reference/ops.py` is the executable definition of every op (the conformance suite checks
backends against it), so it needs a check of its own: each op here is compared with a float64
computation written from the contract (`dsv3/core/ops.py`) and DeepSeek-V3's definitions
(`../shared/DESIGN.md`), and with transformers' DeepSeek-V3 code where it has the op (interleaved RoPE,
the noaux_tc router). Nothing here calls the reference or the conformance helpers to build an answer;
FP8 values are decoded from their bits and rounded by hand.

Inputs are fresh every run (a seed from `random.randrange`, named in every assertion message) and never
zeros. Each check is shown to fail on a plausible bug by `test_a_plausible_bug_fails_its_oracle`.
"""
from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dsv3.backends.reference import ops as reference
from dsv3.core.ops import OP_NAMES, ExpertWeights, GateSpec
from dsv3.core.weights import QuantWeight

EPS32 = torch.finfo(torch.float32).eps   # 2^-23; the unit roundoff u is eps/2
BLOCK = 128                              # DeepSeek-V3's weight_block_size and activation group
FP8 = {torch.float8_e4m3fn: dict(bias=7, max=448.0), torch.float8_e4m3fnuz: dict(bias=8, max=240.0)}
FP8_OF_FORMAT = {"fp8-block": torch.float8_e4m3fn, "fp8-fnuz": torch.float8_e4m3fnuz}

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: threads only add contention on a busy runner


def fp32_tolerance(n: int) -> float:
    """max|op - oracle| / max|oracle| allowed for a float32 op whose outputs are sums of at most n terms.

    A float32 sum of n terms, in any order, is within n*u of the exact sum relative to sum|terms|
    (Higham, Accuracy and Stability of Numerical Algorithms, Thm 3.1/3.5; u = eps/2); with O(1) random
    inputs sum|terms| is at most ~0.3*sqrt(n) times max|output| at these sizes (<= 3x here), and the
    inputs' own roundings (a dequantised product, exp, a division, the output cast) add a few u more.
    4 eps * n = 8 u * n covers that worst case; the errors measured are 10-700x below it. A real bug
    (wrong layout, mask, scale, expert) errs by 1e-3 to 1 of the output's scale, far above.
    """
    return 4 * EPS32 * n


def fresh_seed() -> tuple[int, torch.Generator]:
    seed = random.randrange(2**32)
    return seed, torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """max|out - oracle| / max|oracle|, in float64: error relative to the output's scale."""
    diff = (out.double() - oracle.double()).abs().max().item()
    return float("inf") if diff != diff else diff / oracle.double().abs().max().item()


def assert_close(out, oracle, tol: float, what: str, seed: int) -> None:
    assert tuple(out.shape) == tuple(oracle.shape), f"{what}: shape {list(out.shape)}, oracle {list(oracle.shape)}"
    err = rel_err(out, oracle)
    assert err <= tol, f"{what}: max rel error {err:.3e} > tolerance {tol:.3e} (seed {seed})"


# -- FP8 by hand: e4m3 is 1 sign, 4 exponent, 3 mantissa bits; fn has bias 7 (max 448), fnuz bias 8 (max 240) ---

def fp8_decode(data: torch.Tensor) -> torch.Tensor:
    """fp8 tensor -> float64 from its bits (fn: 0x7F/0xFF are NaN; fnuz: 0x80 is NaN, there is no -0)."""
    bias = FP8[data.dtype]["bias"]
    b = data.view(torch.uint8).long()
    sign = torch.where(b >= 128, -1.0, 1.0).double()
    exp, man = (b >> 3) & 15, (b & 7).double()
    value = torch.where(exp == 0, man / 8 * 2.0 ** (1 - bias), (1 + man / 8) * torch.exp2((exp - bias).double()))
    nan = ((b & 0x7F) == 0x7F) if data.dtype == torch.float8_e4m3fn else (b == 0x80)
    return torch.where(nan, float("nan"), sign * value)


def fp8_step(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of e4m3 values at |v| (float64): 2^(e-3) with e = exponent of |v|, subnormals 2^(1-bias-3)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(1e-300))).clamp_min(1 - FP8[dtype]["bias"])
    return torch.exp2(e - 3)


def fp8_round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> the nearest e4m3 value (ties to even, as torch.round), saturated at fp8_max."""
    step = fp8_step(v, dtype)
    return (torch.round(v / step) * step).clamp(-FP8[dtype]["max"], FP8[dtype]["max"])


def random_fp8(g: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Uniformly random e4m3 bit patterns, NaN excluded: every value the format has, subnormals and max too."""
    bits = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
    nan = ((bits & 0x7F) == 0x7F) if dtype == torch.float8_e4m3fn else (bits == 0x80)
    return torch.where(nan, bits ^ 1, bits).to(torch.uint8).view(dtype)


def fp8_rms(dtype: torch.dtype) -> float:
    every = fp8_decode(torch.arange(256, dtype=torch.int64).to(torch.uint8).view(dtype))
    return every[~every.isnan()].pow(2).mean().sqrt().item()


def quantize_act64(x: torch.Tensor, dtype: torch.dtype, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's 1x128 activation quantisation in float64: scale = amax / fp8_max per group of 128
    channels (the last group partial), rounded UP to a power of two for ue8m0 (V3.1); values
    x / scale rounded to e4m3. Returns (values [T, K] float64 on the fp8 grid, scales [T, ceil(K/128)])."""
    t, k = x.shape
    groups = [x[:, g0:g0 + BLOCK].double() for g0 in range(0, k, BLOCK)]
    scale = torch.stack([grp.abs().amax(-1) for grp in groups], -1) / FP8[dtype]["max"]
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = torch.cat([fp8_round(grp / scale[:, i:i + 1], dtype) for i, grp in enumerate(groups)], -1)
    return q, scale


def fake_quant64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values x's ue8m0 1x128 quantisation stands for: q * scale, per group."""
    q, scale = quantize_act64(x, dtype, ue8m0=True)
    return q * scale[:, torch.arange(x.shape[-1]) // BLOCK]


def rounding_margin(x: torch.Tensor, dtype: torch.dtype) -> float:
    """How close (in fp8 steps) any x / scale of a ue8m0 quantisation lies to a rounding midpoint, or its
    scale's argument to a power of two: where float32 and float64 may legitimately round differently."""
    _, scale = quantize_act64(x, dtype, ue8m0=True)
    v = x.double() / scale[:, torch.arange(x.shape[-1]) // BLOCK]
    frac = (v / fp8_step(v, dtype)) % 1.0
    amax_ratio = torch.log2(scale) - torch.log2(torch.stack(
        [x[:, g0:g0 + BLOCK].double().abs().amax(-1) for g0 in range(0, x.shape[-1], BLOCK)], -1) / FP8[dtype]["max"])
    return min((frac - 0.5).abs().min().item(), torch.minimum(amax_ratio, 1 - amax_ratio).min().item())


# -- weights in every format, built from random bits, and their float64 value ------------------------------

def random_weight(g: torch.Generator, out_f: int, in_f: int, fmt: str, lead: tuple = ()) -> QuantWeight:
    """A weight in `fmt` with random data and random scales (not a quantisation of anything: the scale
    layout is tested, not a quantiser). Real values have RMS ~ in_f^-0.5."""
    std = in_f ** -0.5
    if fmt == "dense":
        return QuantWeight(randn(g, *lead, out_f, in_f, std=std), None, "dense")
    spread = lambda *shape: torch.exp2(torch.rand(*shape, generator=g) * 2 - 1)   # noqa: E731 - in [0.5, 2)
    if fmt in FP8_OF_FORMAT:
        dtype = FP8_OF_FORMAT[fmt]
        scale = spread(*lead, -(-out_f // BLOCK), -(-in_f // BLOCK)) * (std / fp8_rms(dtype))
        return QuantWeight(random_fp8(g, (*lead, out_f, in_f), dtype), scale.float(), fmt)
    if fmt == "int8-w8a8":
        data = torch.randint(-127, 128, (*lead, out_f, in_f), generator=g, dtype=torch.int8)
        return QuantWeight(data, (spread(*lead, out_f) * std / 73.3).float(), fmt)   # 73.3: RMS of U{-127..127}
    raise ValueError(fmt)


def weight64(w: QuantWeight) -> torch.Tensor:
    """The real-valued weight, float64: fp8 bits * weight_scale_inv of its 128x128 block (edge blocks
    partial), int8 * per-output-channel scale, dense as is."""
    if w.format == "dense":
        return w.data.double()
    out_f, in_f = w.data.shape[-2:]
    if w.format in FP8_OF_FORMAT:
        block_scale = w.scale.double()[..., torch.arange(out_f) // BLOCK, :][..., torch.arange(in_f) // BLOCK]
        return fp8_decode(w.data) * block_scale
    return w.data.double() * w.scale.double()[..., :, None]


# -- oracles (float64) ------------------------------------------------------------------------------------

def rms_norm64(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def rope64(x, positions, cos, sin):
    """DeepSeek's own formulation: consecutive pairs (x[2i], x[2i+1]) as complex numbers, times
    cos + i sin of angle i at the token's position, written back in place (interleaved)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())       # [T, H, R/2]
    rot = torch.complex(cos.double(), sin.double())[positions].unsqueeze(1)                  # [T, 1, R/2]
    return torch.view_as_real(z * rot).flatten(-2)


def rope_transformers(x, positions, cos, sin):
    """transformers' DeepseekV3 rotary application (rope_interleave=True) on the same tables. It reads
    interleaved pairs but writes [rotated evens | rotated odds] (the same permutation for q and k leaves
    q.k unchanged); re-interleave to compare with the contract's in-place layout."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    c = torch.cat((cos, cos), -1).double()[positions][None]            # [1, T, R]: HF tables are cat(f, f)
    s = torch.cat((sin, sin), -1).double()[positions][None]
    xh = x.double().transpose(0, 1)[None]                              # [1, H, T, R]
    out, _ = apply_rotary_pos_emb_interleave(xh, xh, c, s)
    halves = out[0].transpose(0, 1)                                    # [T, H, R] as [evens | odds]
    r = x.shape[-1]
    return torch.stack((halves[..., : r // 2], halves[..., r // 2:]), -1).flatten(-2)


def linear64(x, w: QuantWeight):
    xd = x.double()
    if w.format in FP8_OF_FORMAT and w.act_scale_fmt == "ue8m0":
        xd = fake_quant64(xd, FP8_OF_FORMAT[w.format])
    return xd @ weight64(w).transpose(-1, -2)


def silu64(g):
    g = g.double()
    return g / (1 + torch.exp(-g))


def prefill64(q, k, v, lens_q, lens_k, scale):
    """Per sequence: SDPA in float64 with query i of lq at key position lk - lq + i (end-aligned causal)."""
    out, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)     # [lq, lk], True = attend
        qb, kb, vb = (t.double().transpose(0, 1) for t in (q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]))
        out.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(out)


def decode64(q_latent, q_rope, cache, block_table, context_lens, scale):
    """Per token: gather its first n cached rows through the block table (position p lives in block
    table[p // block_size] at offset p % block_size), then SDPA in float64 with keys [latent | k_rope]
    and values latent."""
    bs, c = cache.shape[1], q_latent.shape[-1]
    out = []
    for t, n in enumerate(context_lens.tolist()):
        p = torch.arange(n)
        rows = cache.double()[block_table[t, p // bs].long(), p % bs]                       # [n, C + R]
        qt = torch.cat((q_latent[t], q_rope[t]), -1).double()[:, None]                       # [H, 1, C + R]
        h = qt.shape[0]
        o = F.scaled_dot_product_attention(qt, rows.expand(h, n, -1), rows[:, :c].expand(h, n, c), scale=scale)
        out.append(o[:, 0])
    return torch.stack(out)


def gate64(x, weight, bias, spec: GateSpec):
    """noaux_tc in float64. Returns (weights [T, k], ids [T, k], margin [T]): the margin is the smallest
    gap at a cut (kept vs dropped group, chosen vs next expert), where a float32 rounding could flip the
    choice."""
    s = torch.sigmoid(x.double() @ weight.double().T)                              # [T, E] unbiased scores
    choice = s + (0 if bias is None else bias.double())                            # for selection only
    t, e = choice.shape
    per_group = e // spec.n_group
    grouped = choice.view(t, spec.n_group, per_group)
    group_score = grouped.topk(min(2, per_group), -1).values.sum(-1)               # [T, n_group]
    ranked = group_score.sort(-1, descending=True).values
    group_margin = (ranked[:, spec.topk_group - 1] - ranked[:, spec.topk_group] if spec.topk_group < spec.n_group
                    else torch.full((t,), math.inf, dtype=torch.float64))
    keep = group_score >= ranked[:, spec.topk_group - 1: spec.topk_group]
    masked = grouped.masked_fill(~keep[..., None], -math.inf).view(t, e)
    top = masked.topk(spec.top_k + 1, -1)
    expert_margin = top.values[:, spec.top_k - 1] - top.values[:, spec.top_k]
    ids = top.indices[:, : spec.top_k]
    w = s.gather(1, ids)
    if spec.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return w * spec.routed_scaling_factor, ids, torch.minimum(group_margin, expert_margin)


def gate_transformers(x, weight, bias, spec: GateSpec):
    """transformers' DeepseekV3TopkRouter (float32) built from a tiny config with the same weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    config = DeepseekV3Config(hidden_size=x.shape[-1], n_routed_experts=weight.shape[0], num_experts_per_tok=spec.top_k,
                              n_group=spec.n_group, topk_group=spec.topk_group, norm_topk_prob=spec.norm_topk_prob,
                              routed_scaling_factor=spec.routed_scaling_factor)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
        _, w, ids = router(x)
    return w, ids


def experts64(x, topk_weights, topk_ids, experts: ExpertWeights):
    """Per token, per chosen expert held in [first_expert, first_expert + E): w * down(silu(gate x) * up x),
    float64 with dequantised weights; ue8m0 FP8 weights quantise x and the down input as `linear` does."""
    gate, up, down = (weight64(w) for w in (experts.gate, experts.up, experts.down))
    fp8 = FP8_OF_FORMAT.get(experts.down.format) if experts.down.act_scale_fmt == "ue8m0" else None
    quant = (lambda a: fake_quant64(a, fp8)) if fp8 else (lambda a: a)        # noqa: E731
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = quant(x[t:t + 1].double())                                      # [1, D]
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j]) - experts.first_expert
            if 0 <= e < gate.shape[0]:
                h = silu64(xt @ gate[e].T) * (xt @ up[e].T)                  # [1, I]
                out[t] += topk_weights[t, j].double() * (quant(h) @ down[e].T)[0]
    return out


# -- the checks: op is the implementation under test (the reference, or a mutant of it) -------------------

def check_embedding(op, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = randn(g, 300, 40).to(dtype)
    ids = torch.randint(0, 300, (23,), generator=g)
    out = op(ids, weight)
    oracle = torch.stack([weight[i] for i in ids.tolist()])
    assert out.dtype == dtype and torch.equal(out, oracle), f"embedding: rows differ (seed {seed})"


def check_rms_norm(op, seed, std=3.0):
    g = torch.Generator().manual_seed(seed)
    for width in (200, 40):
        x, weight, eps = randn(g, 7, width, std=std), 1 + 0.1 * randn(g, width), 1e-6
        out = op(x, weight, eps)
        assert out.dtype == x.dtype
        assert_close(out, rms_norm64(x, weight, eps), fp32_tolerance(width + 2), f"rms_norm x[7,{width}] std {std}", seed)


def check_add_rms_norm(op, seed):
    g = torch.Generator().manual_seed(seed)
    x, residual, weight, eps = randn(g, 7, 200), randn(g, 7, 200, std=4.0), 1 + 0.1 * randn(g, 200), 1e-6
    normed, h = op(x, residual, weight, eps)
    h64 = x.double() + residual.double()
    assert_close(h, h64, fp32_tolerance(1), "add_rms_norm: h = x + residual", seed)
    assert_close(normed, rms_norm64(h64, weight, eps), fp32_tolerance(200 + 3), "add_rms_norm: rms_norm(h)", seed)


def rope_inputs(g, heads=3, rope_dim=8, tokens=7, positions=64):
    angles = randn(g, positions, rope_dim // 2, std=3.0)
    mscale = 1.0 + 0.1 * torch.rand((), generator=g).item()     # YaRN's attention factor scales both tables
    return (randn(g, tokens, heads, rope_dim), torch.randint(0, positions, (tokens,), generator=g),
            angles.cos() * mscale, angles.sin() * mscale)


def check_rope(op, seed):
    g = torch.Generator().manual_seed(seed)
    for heads, rope_dim in ((3, 8), (1, 64)):
        args = rope_inputs(g, heads, rope_dim)
        out = op(*args)
        assert out.dtype == args[0].dtype
        # products of two terms, summed: n = 2 (plus the table lookup, exact)
        assert_close(out, rope64(*args), fp32_tolerance(2), f"rope x[7,{heads},{rope_dim}] vs complex pairs", seed)
        assert_close(out, rope_transformers(*args), fp32_tolerance(2),
                     f"rope x[7,{heads},{rope_dim}] vs transformers' apply_rotary_pos_emb_interleave", seed)


LINEAR_CASES = [("dense", None), ("fp8-block", None), ("fp8-fnuz", None), ("int8-w8a8", None),
                ("fp8-block", "ue8m0"), ("fp8-fnuz", "ue8m0")]


def check_linear(op, seed, fmt="fp8-block", acts=None):
    g = torch.Generator().manual_seed(seed)
    for out_f, in_f in ((136, 200), (40, 128)):          # partial 128-blocks both ways, then a whole one
        w = replace(random_weight(g, out_f, in_f, fmt), act_scale_fmt=acts)
        x = randn(g, 7, in_f)
        out = op(x, w)
        assert out.dtype == x.dtype
        assert_close(out, linear64(x, w), fp32_tolerance(in_f + 2),
                     f"linear x[7,{in_f}] w[{out_f},{in_f}] {fmt}{' ue8m0 acts' if acts else ''}", seed)


def check_silu_mul(op, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up = randn(g, 7, 136, std=3.0), randn(g, 7, 136)
    assert_close(op(gate, up), silu64(gate) * up.double(), fp32_tolerance(2), "silu_mul", seed)


def check_quantize_act(op, seed, dtype=torch.float8_e4m3fn, ue8m0=False):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, 7, 200, std=2.0)
    x[:, :BLOCK] *= torch.exp2(torch.randint(-12, 12, (7, 1), generator=g))   # groups of very different scales
    x[3, 5] = 0.0                                                          # a zero inside a group is fine
    q, scale = op(x, dtype, ue8m0)
    what = f"quantize_act {str(dtype).removeprefix('torch.')}{' ue8m0' if ue8m0 else ''}"
    assert q.dtype == dtype and q.shape == x.shape, f"{what}: values {q.dtype} {list(q.shape)} (seed {seed})"
    assert scale.dtype == torch.float32 and scale.shape == (7, 2), f"{what}: scale {scale.dtype} {list(scale.shape)}"
    q_oracle, scale_oracle = quantize_act64(x, dtype, ue8m0)
    fp8_max, qv = FP8[dtype]["max"], fp8_decode(q)
    if ue8m0:   # a power of two, the smallest with amax / scale <= fp8_max: exactly the oracle's
        assert torch.equal(scale.double(), scale_oracle), f"{what}: scales {scale} != {scale_oracle} (seed {seed})"
        assert (torch.frexp(scale).mantissa == 0.5).all(), f"{what}: a scale is not a power of two (seed {seed})"
    else:       # amax / fp8_max: one float32 division
        err = ((scale.double() - scale_oracle).abs() / scale_oracle).max().item()
        assert err <= EPS32, f"{what}: scales off amax/fp8_max by {err:.2e} relative (seed {seed})"
    # values: x / scale rounded to e4m3; float32 vs float64 scales may flip a value at a rounding
    # midpoint by one step (one step of e4m3 at |q|), never more, and only rarely
    off = (qv - q_oracle).abs()
    assert (off <= fp8_step(q_oracle, dtype)).all(), f"{what}: values off by more than one fp8 step (seed {seed})"
    assert (off > 0).sum().item() <= (0 if ue8m0 else x.numel() // 100), f"{what}: {(off > 0).sum()} values differ"
    group_max = torch.stack([qv[:, :BLOCK].abs().amax(-1), qv[:, BLOCK:].abs().amax(-1)], -1)
    if ue8m0:   # rounding the scale up (not to nearest, not down) leaves every group's max in [fp8_max/2, fp8_max]
        assert ((group_max >= fp8_max / 2) & (group_max <= fp8_max)).all(), f"{what}: group maxima {group_max} (seed {seed})"
    else:
        assert (group_max == fp8_max).all(), f"{what}: a group's amax is not at fp8_max: {group_max} (seed {seed})"


def check_write_latent_cache(op, seed, cache_dtype=torch.float32, padding=False):
    g = torch.Generator().manual_seed(seed)
    num_blocks, block_size, c, r = 5, 16, 40, 8
    cache = randn(g, num_blocks, block_size, c + r).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size - 1, generator=g)[:23]   # the last row unwritten: a -1 that wraps shows
    if padding:   # the padding rows of a captured batch: slot -1 writes nothing
        slots[torch.randperm(23, generator=g)[:5]] = -1
    latent, k_rope = randn(g, 23, c), randn(g, 23, r)
    oracle = cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            oracle[slot // block_size, slot % block_size] = torch.cat((latent[t], k_rope[t])).to(cache_dtype)
    assert op(cache, latent, k_rope, slots) is None
    wrong = (cache != oracle).any(-1).nonzero().tolist()
    assert not wrong, f"write_latent_cache ({cache_dtype}): [block, offset] {wrong[:5]} differ (seed {seed})"


PREFILL_LENS = ([5, 3, 1, 4], [5, 9, 4, 11])   # sequence 0 fresh; the others a chunk after a cached prefix


def prefill_inputs(g, lens_q, lens_k, heads=3, dqk=24, dv=12, dtype=torch.float32):
    tq, tk = sum(lens_q), sum(lens_k)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return (randn(g, tq, heads, dqk).to(dtype), randn(g, tk, heads, dqk).to(dtype), randn(g, tk, heads, dv).to(dtype),
            cu(lens_q), cu(lens_k), 1.3 * dqk ** -0.5)


def check_mla_prefill(op, seed):
    g = torch.Generator().manual_seed(seed)
    lens_q, lens_k = PREFILL_LENS
    q, k, v, cu_q, cu_k, scale = prefill_inputs(g, lens_q, lens_k)
    out = op(q, k, v, cu_q, cu_k, scale)
    # sums: scores over Dqk = 24, softmax over <= 11 keys, P @ V over <= 11; + exp and division
    assert_close(out, prefill64(q, k, v, lens_q, lens_k, scale), fp32_tolerance(24 + 2 * 11 + 4),
                 f"mla_prefill q{lens_q} k{lens_k}", seed)


DECODE_CONTEXT = [1, 7, 16, 17, 35, 50, 51]     # block_size 16 divides one; the last two share a sequence


def decode_inputs(g, context, block_size=16, heads=3, c=40, r=8, dtype=torch.float32):
    seqs = context[:-1]                          # token t reads sequence t; the last token reads the last sequence
    per_seq = [-(-n // block_size) for n in seqs]
    num_blocks = sum(per_seq) + 3                # spare blocks hold values that must never be read
    order = torch.randperm(num_blocks, generator=g)
    width = max(per_seq) + 1
    table = torch.randint(0, num_blocks, (len(seqs), width), generator=g, dtype=torch.int32)  # unused entries: any block
    at = 0
    for s, n in enumerate(per_seq):
        table[s, :n] = order[at:at + n]
        at += n
    table = torch.cat((table, table[-1:]))       # [T, max_blocks]
    cache = randn(g, num_blocks, block_size, c + r).to(dtype)
    return (randn(g, len(context), heads, c).to(dtype), randn(g, len(context), heads, r).to(dtype), cache, table,
            torch.tensor(context, dtype=torch.int32), 1.2 * (16 + r) ** -0.5)


def check_mla_decode(op, seed):
    g = torch.Generator().manual_seed(seed)
    args = decode_inputs(g, DECODE_CONTEXT)
    # sums: scores over C + R = 48, softmax and P @ latent over <= 51 keys; + exp and division
    assert_close(op(*args), decode64(*args), fp32_tolerance(48 + 2 * 51 + 4), f"mla_decode ctx{DECODE_CONTEXT}", seed)


GATE_SPECS = {   # name: (experts, spec, whether half of each group's biases are below -1)
    "16 experts, 2 of 4 groups, top 3": (16, GateSpec(3, 4, 2, True, 2.5), False),
    "32 experts, 4 of 8 groups, top 8 (V3's ratios)": (32, GateSpec(8, 8, 4, True, 2.5), False),
    "16 experts, no normalisation": (16, GateSpec(4, 4, 2, False, 1.5), False),
    # biased scores below 0 inside the kept groups, at the top-k cut: dropped groups must lose to them (-inf, not 0)
    "16 experts, top 6 of 2 kept groups, negative biases": (16, GateSpec(6, 4, 2, True, 2.5), True),
}


def gate_inputs(g, experts, spec, negative_biases=False, tokens=64, hidden=200, bias_std=0.3, margin=1e-4):
    """Router inputs with every choice decided by at least `margin` (float32 errors are ~1e-6): near-tied
    tokens are redrawn, so the expert ids must match exactly."""
    weight = randn(g, experts, hidden, std=2 * hidden ** -0.5)
    bias = bias_std * randn(g, experts)
    if negative_biases:
        per_group = experts // spec.n_group
        bias = torch.where(torch.arange(experts) % per_group >= per_group // 2, bias.abs() * -1 - 1, bias)
    x = randn(g, tokens, hidden)
    for _ in range(100):
        near = gate64(x, weight, bias, spec)[2] < margin
        if not near.any():
            return x, weight, bias
        x[near] = randn(g, int(near.sum()), hidden)
    raise AssertionError("could not draw router inputs without near-ties")


def check_moe_gate(op, seed, case="16 experts, 2 of 4 groups, top 3", with_bias=True):
    g = torch.Generator().manual_seed(seed)
    experts, spec, negative_biases = GATE_SPECS[case]
    x, weight, bias = gate_inputs(g, experts, spec, negative_biases)
    bias = bias if with_bias else None
    w, ids = op(x, weight, bias, spec)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (64, spec.top_k)
    what = f"moe_gate {case}{'' if with_bias else ' without bias'}"
    order = ids.sort(-1)
    w_sorted = w.gather(1, order.indices)
    for name, (w_o, ids_o) in (("float64 formula", gate64(x, weight, bias, spec)[:2]),
                               ("transformers' DeepseekV3TopkRouter", gate_transformers(x, weight, bias, spec))):
        order_o = ids_o.sort(-1)
        wrong = (order.values != order_o.values).any(-1).nonzero().flatten().tolist()
        assert not wrong, (f"{what}: tokens {wrong[:5]} chose experts {order.values[wrong[0]].tolist()}, {name} "
                           f"{order_o.values[wrong[0]].tolist()} (seed {seed})")
        # weights: sigmoid of a D-term dot product, then a sum of k for the normalisation
        assert_close(w_sorted, w_o.gather(1, order_o.indices), fp32_tolerance(200 + spec.top_k + 4),
                     f"{what}: weights vs {name}", seed)


EXPERT_CASES = [("dense", None), ("fp8-block", None), ("fp8-fnuz", None), ("int8-w8a8", None), ("fp8-block", "ue8m0")]


def expert_inputs(g, fmt, acts, tokens=7, hidden=200, inter=48, local=6, first=4, top_k=3):
    """An expert-parallel slice: local experts first..first+local-1 of a larger pool; routes are drawn from
    first-top_k .. first+local+top_k-1, so some fall outside the slice on either side."""
    experts = ExpertWeights(*(replace(random_weight(g, o, i, fmt, lead=(local,)), act_scale_fmt=acts)
                              for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))), first)
    ids = torch.stack([torch.randperm(local + 2 * top_k, generator=g)[:top_k] for _ in range(tokens)]) + first - top_k
    weights = torch.rand(tokens, top_k, generator=g) + 0.05
    return randn(g, tokens, hidden), weights, ids, experts


def check_moe_experts(op, seed, fmt="fp8-block", acts=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        x, weights, ids, experts = expert_inputs(g, fmt, acts)
        if acts is None:
            break
        # ue8m0: the oracle quantises its float64 h, the op its float32 h; redraw where they could round apart
        dtype = FP8_OF_FORMAT[fmt]
        xq = fake_quant64(x, dtype)
        h = silu64(xq @ weight64(experts.gate).transpose(1, 2)) * (xq @ weight64(experts.up).transpose(1, 2))  # [E, T, I]
        if min(rounding_margin(h.flatten(0, 1), dtype), rounding_margin(x, dtype)) > 1e-4:
            break
    else:
        raise AssertionError(f"could not draw expert inputs away from fp8 rounding midpoints (seed {seed})")
    assert ((ids < experts.first_expert) | (ids >= experts.first_expert + 6)).any(), "no route leaves the slice"
    out = op(x, weights, ids, experts)
    assert out.dtype == x.dtype
    # chained sums: gate/up over D = 200, down over I = 48, then k = 3 routes; + silu and the dequantisation
    assert_close(out, experts64(x, weights, ids, experts), fp32_tolerance(200 + 48 + 3 + 6),
                 f"moe_experts {fmt}{' ue8m0 acts' if acts else ''} experts 4..9, routes outside", seed)


# -- the tests -------------------------------------------------------------------------------------------

CHECKS = {name: globals()[f"check_{name}"] for name in OP_NAMES}


def test_every_op_of_the_contract_has_an_oracle():
    assert set(CHECKS) == set(OP_NAMES) == set(reference.OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_gathers_rows_exactly(dtype):
    check_embedding(reference.embedding, fresh_seed()[0], dtype)


@pytest.mark.parametrize("std", [3.0, 1e-3])    # at 1e-3, mean(x^2) ~ eps: where eps sits matters
def test_rms_norm_is_its_formula(std):
    check_rms_norm(reference.rms_norm, fresh_seed()[0], std)


def test_add_rms_norm_returns_the_normed_sum_and_the_sum():
    check_add_rms_norm(reference.add_rms_norm, fresh_seed()[0])


def test_rope_rotates_interleaved_pairs_as_deepseek_and_transformers_do():
    check_rope(reference.rope, fresh_seed()[0])


@pytest.mark.parametrize("fmt,acts", LINEAR_CASES, ids=[f"{f}{'-ue8m0' if a else ''}" for f, a in LINEAR_CASES])
def test_linear_is_dequantise_then_matmul(fmt, acts):
    check_linear(reference.linear, fresh_seed()[0], fmt, acts)


def test_silu_mul_is_its_formula():
    check_silu_mul(reference.silu_mul, fresh_seed()[0])


@pytest.mark.parametrize("ue8m0", [False, True], ids=["amax", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
def test_quantize_act_is_1x128_amax_over_fp8_max(dtype, ue8m0):
    check_quantize_act(reference.quantize_act, fresh_seed()[0], dtype, ue8m0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_latent_cache_writes_exactly_the_slots(cache_dtype):
    check_write_latent_cache(reference.write_latent_cache, fresh_seed()[0], cache_dtype)


def test_write_latent_cache_skips_negative_slots():
    check_write_latent_cache(reference.write_latent_cache, fresh_seed()[0], padding=True)


def test_mla_prefill_is_end_aligned_causal_attention_per_sequence():
    check_mla_prefill(reference.mla_prefill, fresh_seed()[0])


def test_mla_decode_attends_over_the_paged_cache_through_the_block_table():
    check_mla_decode(reference.mla_decode, fresh_seed()[0])


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(GATE_SPECS))
def test_moe_gate_is_noaux_tc_as_transformers_routes(case, with_bias):
    check_moe_gate(reference.moe_gate, fresh_seed()[0], case, with_bias)


@pytest.mark.parametrize("fmt,acts", EXPERT_CASES, ids=[f"{f}{'-ue8m0' if a else ''}" for f, a in EXPERT_CASES])
def test_moe_experts_sums_the_chosen_experts_of_the_slice(fmt, acts):
    check_moe_experts(reference.moe_experts, fresh_seed()[0], fmt, acts)


def test_fp8_by_hand_agrees_with_torch():
    """The hand-written e4m3 decoder and rounding are themselves checked against torch's casts."""
    seed, g = fresh_seed()
    for dtype in FP8:
        every = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(dtype)
        decoded, torch_value = fp8_decode(every), every.double()
        assert torch.equal(decoded.isnan(), torch_value.isnan())
        assert torch.equal(decoded[~decoded.isnan()], torch_value[~decoded.isnan()]), dtype
        v = randn(g, 4096, std=30.0).double().clamp(-FP8[dtype]["max"], FP8[dtype]["max"])
        assert torch.equal(fp8_round(v, dtype), v.to(dtype).double()), f"{dtype} (seed {seed})"


# -- each oracle fails a plausible bug ----------------------------------------------------------------------

def _mutants():
    r = reference

    def rope_half_split(x, positions, cos, sin):              # NeoX halves instead of interleaved pairs
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def rope_transformers_layout(x, positions, cos, sin):     # transformers' [evens | odds] output kept as is
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def linear_scale_transposed(x, w):
        return r.linear(x, replace(w, scale=w.scale.T.contiguous()))

    def linear_fnuz_read_as_fn(x, w):                          # the same bits taken for e4m3fn: 2x too large
        return r.linear(x, replace(w, data=w.data.view(torch.uint8).view(torch.float8_e4m3fn), format="fp8-block"))

    def linear_ignoring_ue8m0(x, w):
        return r.linear(x, replace(w, act_scale_fmt=None))

    def quantize_act_ue8m0_to_nearest(x, dtype, ue8m0):
        q, s = r.quantize_act(x, dtype, False)
        if not ue8m0:
            return q, s
        s2 = torch.exp2(torch.round(torch.log2(s)))
        v = x / s2.repeat_interleave(BLOCK, -1)[:, : x.shape[1]]
        return v.clamp(-FP8[dtype]["max"], FP8[dtype]["max"]).to(dtype), s2

    def quantize_act_fn_max_for_fnuz(x, dtype, ue8m0):       # 448 for e4m3fnuz, whose max is 240
        q, s = r.quantize_act(x, torch.float8_e4m3fn, ue8m0)
        return q.float().to(dtype), s

    def cache_latent_and_rope_swapped(cache, latent, k_rope, slots):
        flat = cache.view(-1, cache.shape[-1])
        flat[slots] = torch.cat((k_rope, latent), -1).to(cache.dtype)

    def prefill_mask_aligned_to_start(q, k, v, cu_q, cu_k, scale):
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1])
        for b in range(len(cu_q) - 1):
            rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            qb, kb, vb = (t.transpose(0, 1) for t in (q[rows_q], k[rows_k], v[rows_k]))
            out[rows_q] = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale).transpose(0, 1)
        return out

    def decode_ignoring_block_table(q_latent, q_rope, cache, block_table, context_lens, scale):
        return r.mla_decode(q_latent, q_rope, cache, torch.arange(block_table.shape[1], dtype=torch.int32)
                            .expand_as(block_table).contiguous(), context_lens, scale)

    def decode_reading_whole_blocks(q_latent, q_rope, cache, block_table, context_lens, scale):
        b = cache.shape[1]
        return r.mla_decode(q_latent, q_rope, cache, block_table, (context_lens + b - 1) // b * b, scale)

    def decode_without_rope_scores(q_latent, q_rope, cache, block_table, context_lens, scale):
        return r.mla_decode(q_latent, torch.zeros_like(q_rope), cache, block_table, context_lens, scale)

    def gate_weights_from_biased_scores(x, weight, bias, spec):
        w, ids = r.moe_gate(x, weight, bias, spec)
        s = torch.sigmoid(x.float() @ weight.float().T) + (0 if bias is None else bias)
        biased = s.gather(1, ids)
        if spec.norm_topk_prob:
            biased = biased / biased.sum(-1, keepdim=True)
        return biased * spec.routed_scaling_factor, ids

    def gate_ignoring_bias(x, weight, bias, spec):
        return r.moe_gate(x, weight, None, spec)

    def gate_group_score_max(x, weight, bias, spec):            # group score = best expert, not top-2 sum
        s = torch.sigmoid(x.float() @ weight.float().T)
        c = s + bias
        t, e = c.shape
        grouped = c.view(t, spec.n_group, -1)
        keep = grouped.amax(-1).topk(spec.topk_group, -1).indices
        mask = torch.zeros(t, spec.n_group, dtype=torch.bool).scatter_(1, keep, True)
        ids = grouped.masked_fill(~mask[..., None], -math.inf).view(t, e).topk(spec.top_k, -1).indices
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) if spec.norm_topk_prob else w
        return w * spec.routed_scaling_factor, ids

    def gate_masked_with_zero(x, weight, bias, spec):          # dropped groups masked with 0, not -inf
        s = torch.sigmoid(x.float() @ weight.float().T)
        c = s + bias
        t, e = c.shape
        grouped = c.view(t, spec.n_group, -1)
        keep = grouped.topk(2, -1).values.sum(-1).topk(spec.topk_group, -1).indices
        mask = torch.zeros(t, spec.n_group, dtype=torch.bool).scatter_(1, keep, True)
        ids = grouped.masked_fill(~mask[..., None], 0.0).view(t, e).topk(spec.top_k, -1).indices
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) if spec.norm_topk_prob else w
        return w * spec.routed_scaling_factor, ids

    def gate_normalising_always(x, weight, bias, spec):
        return r.moe_gate(x, weight, bias, replace(spec, norm_topk_prob=True))

    def experts_ignoring_first_expert(x, topk_weights, topk_ids, experts):
        return r.moe_experts(x, topk_weights, topk_ids, replace(experts, first_expert=0))

    def experts_routes_wrapped_into_the_slice(x, topk_weights, topk_ids, experts):
        e = experts.gate.data.shape[0]
        return r.moe_experts(x, topk_weights, (topk_ids - experts.first_expert) % e + experts.first_expert, experts)

    def experts_unweighted(x, topk_weights, topk_ids, experts):
        return r.moe_experts(x, torch.ones_like(topk_weights), topk_ids, experts)

    def experts_ignoring_ue8m0(x, topk_weights, topk_ids, experts):
        return r.moe_experts(x, topk_weights, topk_ids, ExpertWeights(
            *(replace(w, act_scale_fmt=None) for w in (experts.gate, experts.up, experts.down)), experts.first_expert))

    # name: (check, kwargs, mutant)
    return {
        "embedding off by one": (check_embedding, {}, lambda ids, w: F.embedding((ids + 1) % w.shape[0], w)),
        "rms_norm without its weight": (check_rms_norm, {}, lambda x, w, eps: r.rms_norm(x, torch.ones_like(w), eps)),
        "rms_norm with eps outside the sqrt": (check_rms_norm, {"std": 1e-3}, lambda x, w, eps: (
            x * w / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps))),
        "add_rms_norm returning the normed sum twice": (check_add_rms_norm, {}, lambda x, res, w, eps: (
            (n := r.rms_norm(x + res, w, eps)), n)),
        "rope on the NeoX half-split layout": (check_rope, {}, rope_half_split),
        "rope in transformers' output order": (check_rope, {}, rope_transformers_layout),
        "rope with the sine's sign flipped": (check_rope, {}, lambda x, p, c, s: r.rope(x, p, c, -s)),
        "linear ignoring weight_scale_inv": (check_linear, {}, lambda x, w: F.linear(x, w.data.float())),
        "linear with the block scales transposed": (check_linear, {}, linear_scale_transposed),
        "linear reading e4m3fnuz bits as e4m3fn": (check_linear, {"fmt": "fp8-fnuz"}, linear_fnuz_read_as_fn),
        "linear int8 without its channel scales": (check_linear, {"fmt": "int8-w8a8"}, lambda x, w: F.linear(
            x, w.data.float())),
        "linear ignoring ue8m0 activations": (check_linear, {"acts": "ue8m0"}, linear_ignoring_ue8m0),
        "silu_mul with silu on up": (check_silu_mul, {}, lambda gate, up: F.silu(up) * gate),
        "quantize_act with one scale per token": (check_quantize_act, {}, lambda x, d, u: (
            lambda q, s: (q, s.amax(-1, keepdim=True).expand_as(s).contiguous()))(*r.quantize_act(x, d, u))),
        "quantize_act ue8m0 rounded to nearest": (check_quantize_act, {"ue8m0": True}, quantize_act_ue8m0_to_nearest),
        "quantize_act ue8m0 not rounded": (check_quantize_act, {"ue8m0": True}, lambda x, d, u: r.quantize_act(x, d, False)),
        "quantize_act with e4m3fn's max for e4m3fnuz": (check_quantize_act, {"dtype": torch.float8_e4m3fnuz},
                                                        quantize_act_fn_max_for_fnuz),
        "write_latent_cache off by one slot": (check_write_latent_cache, {}, lambda c, lat, kr, s: (
            r.write_latent_cache(c, lat, kr, (s + 1) % (c.shape[0] * c.shape[1])))),
        "write_latent_cache with k_rope first": (check_write_latent_cache, {}, cache_latent_and_rope_swapped),
        "write_latent_cache writing slot -1 to the last row": (check_write_latent_cache, {"padding": True}, (
            lambda c, lat, kr, s: c.view(-1, c.shape[-1]).__setitem__(s, torch.cat((lat, kr), -1)))),
        "mla_prefill with the causal mask aligned to the start": (check_mla_prefill, {}, prefill_mask_aligned_to_start),
        "mla_prefill without the softmax scale": (check_mla_prefill, {}, lambda q, k, v, cq, ck, s: (
            r.mla_prefill(q, k, v, cq, ck, 1.0))),
        "mla_decode ignoring the block table": (check_mla_decode, {}, decode_ignoring_block_table),
        "mla_decode reading whole blocks": (check_mla_decode, {}, decode_reading_whole_blocks),
        "mla_decode without the rope scores": (check_mla_decode, {}, decode_without_rope_scores),
        "moe_gate weights from the biased scores": (check_moe_gate, {}, gate_weights_from_biased_scores),
        "moe_gate choosing without the bias": (check_moe_gate, {}, gate_ignoring_bias),
        "moe_gate ignoring groups": (check_moe_gate, {}, lambda x, w, b, spec: (
            r.moe_gate(x, w, b, replace(spec, n_group=1, topk_group=1)))),
        "moe_gate scoring a group by its best expert": (check_moe_gate, {}, gate_group_score_max),
        "moe_gate masking dropped groups with 0": (
            check_moe_gate, {"case": "16 experts, top 6 of 2 kept groups, negative biases"}, gate_masked_with_zero),
        "moe_gate normalising when norm_topk_prob is false": (check_moe_gate, {"case": "16 experts, no normalisation"},
                                                              gate_normalising_always),
        "moe_gate without routed_scaling_factor": (check_moe_gate, {}, lambda x, w, b, spec: (
            r.moe_gate(x, w, b, replace(spec, routed_scaling_factor=1.0)))),
        "moe_experts ignoring first_expert": (check_moe_experts, {}, experts_ignoring_first_expert),
        "moe_experts wrapping outside routes into the slice": (check_moe_experts, {}, experts_routes_wrapped_into_the_slice),
        "moe_experts ignoring the route weights": (check_moe_experts, {}, experts_unweighted),
        "moe_experts ignoring ue8m0 activations": (check_moe_experts, {"acts": "ue8m0"}, experts_ignoring_ue8m0),
    }


MUTANTS = _mutants()


def test_every_op_has_a_mutant():
    assert {check.__name__.removeprefix("check_") for check, _, _ in MUTANTS.values()} == set(OP_NAMES)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_a_plausible_bug_fails_its_oracle(name):
    check, kwargs, mutant = MUTANTS[name]
    seed = fresh_seed()[0]
    with pytest.raises(AssertionError):
        check(mutant, seed, **kwargs)
