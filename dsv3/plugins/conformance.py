"""Backend conformance: every op a backend provides, run against the reference on fresh random inputs.

This is what `dsv3-run check --backend X` runs, and what a plugin author imports in their own tests:

    from dsv3.plugins.conformance import check_ops, check_generation
    results = check_ops(my_ops, CheckSetting.for_profile(profile, spec))   # one OpResult per case
    assert all(r.passed for r in results), format_table(results)

Inputs are random (never zeros), drawn from a seed that is fresh every run and printed, so a failure
can be replayed with `--seed`. Shapes come in two sets: small odd ones (partial 128-blocks, few
heads) and DeepSeek-V3's real per-layer shapes, with counts scaled where memory requires (a few
experts, a slice of the vocabulary, tens of tokens) but every width real.

Error metric, per output tensor: max |backend - reference| / max |reference|, i.e. the worst error
relative to the output's scale (elementwise relative error is meaningless near zero). The reference
runs in float32 on the same (dtype-rounded) inputs, so the error is what the backend's arithmetic
adds. Tolerances follow from that arithmetic (see `tolerance`).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from dsv3.backends.reference import ops as reference
from dsv3.core.errors import Dsv3Error
from dsv3.core.ops import SPARSE_OP_NAMES, ExpertWeights, GateSpec, handles_weight_format
from dsv3.core.quant import fp8_fn_to_fnuz, quantize_fp8_block, quantize_int8_channel
from dsv3.core.weights import BLOCK, QuantWeight

# DeepSeek-V3 (671B) per-layer dimensions, from its config.json.
V3 = dict(hidden=7168, q_lora_rank=1536, kv_lora_rank=512, heads=128, qk_nope=128, qk_rope=64, v_head=128,
          experts=256, top_k=8, n_group=8, topk_group=4, routed_scaling=2.5, moe_inter=2048, inter=18432,
          vocab=129280, max_positions=163840, eps=1e-6)
V32_INDEXER = dict(index_heads=64, index_dim=128, index_topk=2048)   # DeepSeek-V3.2's lightning indexer

FP8_UNIT_ROUNDOFF = 2.0 ** -4    # e4m3: 3 mantissa bits, round to nearest -> |relative error| <= 2^-4
FP8_ULP = 2.0 ** -3              # one e4m3 step, relative to the top of its binade
INT8_BOUND = 3.0 / 127           # per-token int8: 3 steps relative to the row's amax


def tolerance(op: str, dtype: torch.dtype, weight_format: str = "dense", cache_dtype: torch.dtype | None = None,
              act_scale_fmt: str | None = None) -> float:
    """The largest acceptable max|error| / max|reference| for `op` with activations in `dtype`.

    eps = torch.finfo(dtype).eps (bf16 2^-7, fp16 2^-10, fp32 2^-23). Elementwise ops round once or
    twice into `dtype` (each <= eps/2 of an element, so of the max): 2 eps. Reductions (GEMMs,
    attention) also sum in another order and may round intermediates (FlashAttention rounds P to
    bf16): 2 eps too, never below 2e-6 (fp32 sums of thousands of terms). Dynamic activation
    quantisation adds, per product, a random-signed error: fp8 e4m3 rounds each element to within
    u = 2^-4 of itself, and the dot product's error relative to the output's max stays below u
    (measured ~0.45 u at V3's shapes); int8 per token rounds to within amax/254, bounded by 3/127
    (measured ~1/90). The expert MLP quantises twice (gate/up input, then the down input): 2x.
    Gathers and cache writes must be exact (one fp8 step for an fp8 cache). FP8 weights with
    `act_scale_fmt` "ue8m0" (V3.1) fix the activation quantisation, and the reference emulates it, so a
    backend doing the same quantisation differs only by summation order: u/8 is allowed, while
    ignoring the format (amax/fp8_max scales) or not quantising costs 0.02-0.05 (measured).
    """
    eps = torch.finfo(dtype).eps
    if op == "embedding":
        return 0.0
    if op == "write_latent_cache":
        return FP8_ULP if cache_dtype is not None and cache_dtype.is_floating_point and cache_dtype.itemsize == 1 else 0.0
    if op == "quantize_act":
        return FP8_ULP   # dequantised values may differ by one fp8 step (rounding mode); scales must match to 1e-5
    base = max(2 * eps, 2e-6)
    if op in ("linear", "moe_experts") and weight_format.startswith("fp8") and act_scale_fmt == "ue8m0":
        return base + FP8_UNIT_ROUNDOFF / 8
    if op in ("linear", "moe_experts") and weight_format != "dense":
        quant = FP8_UNIT_ROUNDOFF if weight_format.startswith("fp8") else INT8_BOUND
        return base + quant * (2 if op == "moe_experts" else 1)
    return base


@dataclass(frozen=True)
class CheckSetting:
    """What to check with: device, activation dtype, weight formats for linear/experts, cache dtype."""
    device: torch.device
    dtype: torch.dtype = torch.float32
    weight_formats: tuple[str, ...] = ("dense",)   # each is checked at small shapes; the first at real shapes
    cache_dtype: torch.dtype | None = None         # None: the activation dtype
    block_size: int = 64                           # latent cache tokens per block
    ue8m0: bool = False

    @classmethod
    def for_profile(cls, profile, spec, device: str | torch.device | None = None) -> "CheckSetting":
        """The setting a profile runs with on backend `spec`: its dtype, weight format(s), cache dtype."""
        fmt = profile.weight_format
        formats = (fmt,) if fmt != "auto" else tuple(spec.weight_formats)
        formats += tuple(f for f in spec.weight_formats if f not in formats)
        cache = None if profile.kv_cache.dtype == "auto" else getattr(torch, profile.kv_cache.dtype)
        return cls(device=torch.device(device or profile.device or spec.device_type), dtype=getattr(torch, profile.dtype),
                   weight_formats=formats, cache_dtype=cache, block_size=profile.kv_cache.block_size,
                   ue8m0=bool(profile.ue8m0))


@dataclass(frozen=True)
class OpResult:
    op: str
    shape: str
    error: float | None     # max|backend - reference| / max|reference|; None if it could not be computed
    tolerance: float
    seconds: float | None   # one call of the backend's op, after a warm-up call
    problem: str = ""       # why it failed beyond the error (exception, wrong shape, wrong scale ...)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem and self.error is not None and self.error <= self.tolerance


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    args: tuple
    tolerance: float
    compare: Callable          # (backend_out, reference_out, args) -> (error, problem, note)
    in_place: bool = False     # the op writes args[0]; that is what is compared


# -- comparison ----------------------------------------------------------------------------------------

def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64 (0 when both are all zero)."""
    diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _shape_problem(out, ref) -> str:
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, expected a tensor"
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {list(out.shape)}, expected {list(ref.shape)}"
    return ""


def compare_tensors(out, ref, args) -> tuple[float, str, str]:
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    if not isinstance(outs, tuple) or len(outs) != len(refs):
        return float("inf"), f"returned {type(out).__name__}, expected a tuple of {len(refs)} tensors", ""
    errors = []
    for o, r in zip(outs, refs):
        problem = _shape_problem(o, r)
        if problem:
            return float("inf"), problem, ""
        errors.append(relative_error(o.float(), r.float()))
    return max(errors), "", ""


def compare_quantized(out, ref, args) -> tuple[float, str, str]:
    if not isinstance(out, tuple) or len(out) != 2:
        return float("inf"), "expected (fp8 values, float32 scales)", ""
    (q, scale), (q_ref, scale_ref) = out, ref
    problem = _shape_problem(q, q_ref) or _shape_problem(scale, scale_ref)
    if problem:
        return float("inf"), problem, ""
    if q.dtype != q_ref.dtype:
        return float("inf"), f"values are {q.dtype}, expected {q_ref.dtype}", ""
    scale_error = relative_error(scale.float(), scale_ref.float())
    k = q.shape[-1]
    deq = q.float() * scale.float().repeat_interleave(BLOCK, dim=-1)[:, :k]
    deq_ref = q_ref.float() * scale_ref.float().repeat_interleave(BLOCK, dim=-1)[:, :k]
    error = relative_error(deq, deq_ref)
    if scale_error > 1e-5:
        return error, f"scales differ from amax/fp8_max by {scale_error:.1e} (relative; allowed 1e-5)", ""
    return error, "", ""


def compare_gate(out, ref, args) -> tuple[float, str, str]:
    """Expert choice must match, except where the reference's own scores make it a near-tie; the
    weights are compared on tokens whose chosen experts match."""
    if not isinstance(out, tuple) or len(out) != 2:
        return float("inf"), "expected (weights [T, k], expert ids [T, k])", ""
    (w, ids), (w_ref, ids_ref) = out, ref
    problem = _shape_problem(w, w_ref) or _shape_problem(ids, ids_ref)
    if problem:
        return float("inf"), problem, ""
    x, weight, bias, spec = args
    ids, ids_ref = ids.long(), ids_ref.long()
    order, order_ref = ids.sort(-1), ids_ref.sort(-1)
    same = (order.values == order_ref.values).all(-1)                        # [T]
    slack = tolerance("moe_gate", x.dtype) * 2
    flips = (~same).nonzero().flatten().tolist()
    if flips:
        biased = torch.sigmoid(x.float() @ weight.float().T) + (0 if bias is None else bias.float())  # [T, E]
        for t in flips:
            if not _near_tie(biased[t], ids[t], spec, slack):
                return float("inf"), (f"token {t}: experts {sorted(ids[t].tolist())}, reference "
                                      f"{sorted(ids_ref[t].tolist())} (not a near-tie)"), ""
    if not same.any():
        return float("inf"), "no token chose the reference's experts", ""
    w_sorted = w.float().gather(-1, order.indices)[same]
    w_ref_sorted = w_ref.float().gather(-1, order_ref.indices)[same]
    note = f"{len(flips)} near-tie flips" if flips else ""
    return relative_error(w_sorted, w_ref_sorted), "", note


def _near_tie(scores: torch.Tensor, chosen: torch.Tensor, spec: GateSpec, slack: float) -> bool:
    """Is `chosen` a valid noaux_tc choice for biased `scores` [E] if scores may be off by `slack`?"""
    e = scores.numel()
    grouped = scores.view(spec.n_group, e // spec.n_group)
    group_scores = grouped.topk(min(2, e // spec.n_group), dim=-1).values.sum(-1)
    group_cut = group_scores.topk(spec.topk_group).values[-1]
    allowed_group = group_scores >= group_cut - 2 * slack
    expert_group = chosen // (e // spec.n_group)
    if not allowed_group[expert_group].all():
        return False
    kept = grouped.masked_fill(~(group_scores >= group_cut).unsqueeze(-1), float("-inf")).flatten()
    expert_cut = kept.topk(spec.top_k).values[-1]
    return bool((scores[chosen] >= expert_cut - 2 * slack).all()) and chosen.unique().numel() == spec.top_k


# -- inputs ---------------------------------------------------------------------------------------------

class Inputs:
    """Random tensors on one device from one seeded generator; never all zeros."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.device_gen = None
        if device.type == "cuda":
            self.device_gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, std=1.0) -> torch.Tensor:
        if self.device_gen is not None:
            return (torch.randn(*shape, generator=self.device_gen, device=self.device) * std).to(dtype)
        return (torch.randn(*shape, generator=self.gen) * std).to(dtype).to(self.device)

    def randint(self, high, shape, low=0) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen).to(self.device)

    def randperm(self, n) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen).to(self.device)

    def weight(self, out_f: int, in_f: int, fmt: str, dtype: torch.dtype, experts: int | None = None) -> QuantWeight:
        """A random weight in `fmt`, quantised with the project's own quantisers (as a checkpoint would be)."""
        lead = () if experts is None else (experts,)
        w = self.randn(*lead, out_f, in_f, std=in_f ** -0.5)
        if fmt == "dense":
            return QuantWeight(w.to(dtype), None, "dense")
        parts = [quantize_weight(m, fmt) for m in (w.unbind(0) if experts is not None else (w,))]
        if experts is None:
            return parts[0]
        return QuantWeight(torch.stack([p.data for p in parts]), torch.stack([p.scale for p in parts]), fmt)


def quantize_weight(w: torch.Tensor, fmt: str) -> QuantWeight:
    if fmt == "fp8-block":
        return quantize_fp8_block(w)
    if fmt == "fp8-fnuz":
        return fp8_fn_to_fnuz(quantize_fp8_block(w))
    if fmt == "int8-w8a8":
        return quantize_int8_channel(w)
    raise ValueError(f"unknown weight format {fmt!r}")


def _rope_tables(inp: Inputs, positions: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = inp.randn(positions, rope_dim // 2) * 3.0
    mscale = 1.0 + 0.1 * torch.rand((), generator=inp.gen).item()   # YaRN's attention factor scales both
    return angles.cos() * mscale, angles.sin() * mscale


def _cu(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _paged(inp: Inputs, context_lens: list[int], block_size: int, width: int, dtype) -> tuple:
    """A cache [num_blocks, block_size, width] holding each sequence in shuffled blocks, and block tables."""
    per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(per_seq) + 3            # spare blocks hold garbage that must never be read
    order = inp.randperm(num_blocks).tolist()
    table = torch.zeros(len(context_lens), max(per_seq), dtype=torch.int32)
    at = 0
    for t, n in enumerate(per_seq):
        table[t, :n] = torch.tensor(order[at:at + n])
        at += n
    cache = inp.randn(num_blocks, block_size, width).to(dtype)
    return cache, table.to(inp.device)


# -- cases ------------------------------------------------------------------------------------------------

def small_dims() -> dict:
    """Odd sizes: partial 128-blocks (200 = 128 + 72), 3 heads, grouped routing over 16 experts."""
    return dict(hidden=200, q_lora_rank=72, kv_lora_rank=40, heads=3, qk_nope=16, qk_rope=8, v_head=12,
                experts=16, top_k=3, n_group=4, topk_group=2, routed_scaling=2.5, moe_inter=48, inter=136,
                vocab=300, max_positions=256, eps=1e-6, index_heads=5, index_dim=24, index_topk=6)


def cases(ops: set[str], setting: CheckSetting, seed: int, real_shapes: bool = True) -> Iterator[Case]:
    """The cases for `ops`, built one at a time (tensors for real shapes can be large)."""
    inp = Inputs(setting.device, seed)
    sets = [("small", small_dims(), setting.weight_formats)]
    if real_shapes:
        sets.append(("V3", V3, setting.weight_formats[:1]))
    for label, d, formats in sets:
        real = label == "V3"
        yield from _cases_for(ops, setting, inp, d, formats, real)


def _cases_for(ops, setting: CheckSetting, inp: Inputs, d: dict, formats, real: bool) -> Iterator[Case]:
    dt, dev = setting.dtype, setting.device
    t = 64 if real else 7                   # tokens in a flat batch
    tol = lambda op, fmt="dense": tolerance(op, dt, fmt, setting.cache_dtype)  # noqa: E731
    cache_dtype = setting.cache_dtype or dt

    if "embedding" in ops:
        rows = 4096 if real else d["vocab"]
        note = f" (vocab scaled from {d['vocab']})" if real else ""
        yield Case("embedding", f"ids[{t}] w[{rows},{d['hidden']}]{note}",
                   (inp.randint(rows, (t,)), inp.randn(rows, d["hidden"], dtype=dt)), tol("embedding"), compare_tensors)
    if "rms_norm" in ops:
        for width in (d["hidden"], d["q_lora_rank"], d["kv_lora_rank"]):
            yield Case("rms_norm", f"x[{t},{width}]",
                       (inp.randn(t, width, dtype=dt, std=3.0), 1 + 0.1 * inp.randn(width, dtype=dt), d["eps"]),
                       tol("rms_norm"), compare_tensors)
    if "add_rms_norm" in ops:
        width = d["hidden"]
        yield Case("add_rms_norm", f"x[{t},{width}]",
                   (inp.randn(t, width, dtype=dt), inp.randn(t, width, dtype=dt, std=4.0),
                    1 + 0.1 * inp.randn(width, dtype=dt), d["eps"]), tol("add_rms_norm"), compare_tensors)
    if "rope" in ops:
        cos, sin = _rope_tables(inp, d["max_positions"], d["qk_rope"])
        positions = inp.randint(d["max_positions"], (t,))
        for heads in (d["heads"], 1):
            yield Case("rope", f"x[{t},{heads},{d['qk_rope']}] P={d['max_positions']}",
                       (inp.randn(t, heads, d["qk_rope"], dtype=dt), positions, cos, sin), tol("rope"), compare_tensors)
    if "silu_mul" in ops:
        for width in (d["inter"], d["moe_inter"]):
            yield Case("silu_mul", f"[{t},{width}]",
                       (inp.randn(t, width, dtype=dt, std=2.0), inp.randn(t, width, dtype=dt)), tol("silu_mul"),
                       compare_tensors)
    if "quantize_act" in ops:
        fp8_dtypes = [dtype for fmt, dtype in (("fp8-block", torch.float8_e4m3fn), ("fp8-fnuz", torch.float8_e4m3fnuz))
                      if fmt in formats] or [torch.float8_e4m3fn]
        for fp8, width, ue8m0 in ([(fp8_dtypes[0], w, setting.ue8m0) for w in (d["hidden"], d["inter"])] if real else
                                  [(f, d["hidden"], u) for f in fp8_dtypes for u in sorted({setting.ue8m0, True})]):
            if True:
                yield Case("quantize_act", f"x[{t},{width}] {str(fp8).removeprefix('torch.')}{' ue8m0' if ue8m0 else ''}",
                           (inp.randn(t, width, dtype=dt, std=2.0), fp8, ue8m0), tol("quantize_act"), compare_quantized)
    if "linear" in ops:
        projections = [("q_a", d["q_lora_rank"], d["hidden"]), ("q_b", d["heads"] * (d["qk_nope"] + d["qk_rope"]), d["q_lora_rank"]),
                       ("kv_a", d["kv_lora_rank"] + d["qk_rope"], d["hidden"]),
                       ("kv_b", d["heads"] * (d["qk_nope"] + d["v_head"]), d["kv_lora_rank"]),
                       ("o", d["hidden"], d["heads"] * d["v_head"]), ("mlp_up", d["inter"], d["hidden"]),
                       ("mlp_down", d["hidden"], d["inter"]), ("expert_up", d["moe_inter"], d["hidden"])]
        if not real:
            projections = projections[2:4] + projections[6:7]  # partial blocks both ways
        tl = 16 if real else t                  # a decode batch: the weights, not the tokens, make it costly
        for fmt in formats:
            for name, out_f, in_f in projections:
                yield Case("linear", f"{name} x[{tl},{in_f}] w[{out_f},{in_f}] {fmt}",
                           (inp.randn(tl, in_f, dtype=dt), inp.weight(out_f, in_f, fmt, dt)), tol("linear", fmt),
                           compare_tensors)
            if fmt.startswith("fp8"):   # V3.1: power-of-two activation scales, which the reference emulates
                name, out_f, in_f = projections[0]
                w = replace(inp.weight(out_f, in_f, fmt, dt), act_scale_fmt="ue8m0")
                yield Case("linear", f"{name} x[{tl},{in_f}] w[{out_f},{in_f}] {fmt} ue8m0 acts",
                           (inp.randn(tl, in_f, dtype=dt), w), tolerance("linear", dt, fmt, act_scale_fmt="ue8m0"),
                           compare_tensors)
    if "write_latent_cache" in ops:
        block_size, width = setting.block_size, d["kv_lora_rank"] + d["qk_rope"]
        num_blocks = max(2560 // block_size, 2) if real else 3
        n = min(t * 4, num_blocks * block_size)
        slots = inp.randperm(num_blocks * block_size)[:n]
        slots[inp.randperm(n)[: max(1, n // 8)]] = -1     # padding rows of a captured batch: they write nothing
        yield Case("write_latent_cache", f"cache[{num_blocks},{block_size},{width}] {n} slots, some -1",
                   (inp.randn(num_blocks, block_size, width).to(cache_dtype), inp.randn(n, d["kv_lora_rank"], dtype=dt),
                    inp.randn(n, d["qk_rope"], dtype=dt), slots), tol("write_latent_cache"), compare_tensors, in_place=True)
    if "mla_prefill" in ops:
        h, dqk, dv = d["heads"], d["qk_nope"] + d["qk_rope"], d["v_head"]
        q_lens, k_lens = ([200, 64, 1], [200, 320, 77]) if real else ([5, 3, 1], [5, 9, 4])
        tq, tk = sum(q_lens), sum(k_lens)
        yield Case("mla_prefill", f"q[{tq},{h},{dqk}] k[{tk},{h},{dqk}] v[.,{dv}] seqs q{q_lens} k{k_lens}",
                   (inp.randn(tq, h, dqk, dtype=dt), inp.randn(tk, h, dqk, dtype=dt), inp.randn(tk, h, dv, dtype=dt),
                    _cu(q_lens, dev), _cu(k_lens, dev), dqk ** -0.5), tol("mla_prefill"), compare_tensors)
    if "mla_decode" in ops:
        h, c, r = d["heads"], d["kv_lora_rank"], d["qk_rope"]
        block_size = setting.block_size
        context = ([1, block_size - 1, block_size, block_size + 1, 1000, 2048] if real
                   else [1, 5, block_size, 2 * block_size + 2])
        cache, table = _paged(inp, context, block_size, c + r, cache_dtype)
        n = len(context)
        yield Case("mla_decode", f"q[{n},{h},{c}+{r}] cache[{cache.shape[0]},{block_size},{c + r}] ctx{context}",
                   (inp.randn(n, h, c, dtype=dt), inp.randn(n, h, r, dtype=dt), cache, table,
                    torch.tensor(context, dtype=torch.int32, device=dev), (d["qk_nope"] + r) ** -0.5),
                   tol("mla_decode"), compare_tensors)
    if set(SPARSE_OP_NAMES) & set(ops):
        yield from _sparse_cases(ops, setting, inp, {**V32_INDEXER, **d}, real)
    if "moe_gate" in ops:
        spec = GateSpec(d["top_k"], d["n_group"], d["topk_group"], True, d["routed_scaling"])
        tg = 128 if real else 16
        yield Case("moe_gate", f"x[{tg},{d['hidden']}] w[{d['experts']},{d['hidden']}] top{spec.top_k} "
                   f"groups {spec.topk_group}/{spec.n_group}",
                   (inp.randn(tg, d["hidden"], dtype=dt), inp.randn(d["experts"], d["hidden"], dtype=dt,
                                                                   std=d["hidden"] ** -0.5),
                    0.1 * inp.randn(d["experts"]), spec), tol("moe_gate"), compare_gate)
    if "moe_experts" in ops:
        local, first = (4, 32) if real else (6, 4)         # an expert-parallel slice of the experts
        k = d["top_k"]
        pool = local + 2 * k                                 # some routes leave the slice: they must add nothing
        ids = torch.stack([inp.randperm(pool)[:k] for _ in range(t)]) + first - k
        weights = inp.randn(t, k).abs() + 0.05
        variants = [(fmt, None) for fmt in formats] + [(fmt, "ue8m0") for fmt in formats if fmt.startswith("fp8")]
        for fmt, acts in variants:
            experts = ExpertWeights(*(replace(inp.weight(o, i, fmt, dt, experts=local), act_scale_fmt=acts)
                                      for o, i in ((d["moe_inter"], d["hidden"]), (d["moe_inter"], d["hidden"]),
                                                   (d["hidden"], d["moe_inter"]))), first)
            yield Case("moe_experts", f"x[{t},{d['hidden']}] experts {first}..{first + local - 1} of top{k} "
                       f"I={d['moe_inter']} {fmt}{' ue8m0 acts' if acts else ''}",
                       (inp.randn(t, d["hidden"], dtype=dt), weights, ids, experts),
                       tolerance("moe_experts", dt, fmt, act_scale_fmt=acts), compare_tensors)


def _sparse_cases(ops, setting: CheckSetting, inp: Inputs, d: dict, real: bool) -> Iterator[Case]:
    """DeepSeek Sparse Attention (V3.2): cache rows [latent | k_rope | indexer key], shuffled blocks, contexts
    shorter and longer than index_topk, -1 slots."""
    dt, dev, block_size = setting.dtype, setting.device, setting.block_size
    cache_dtype = setting.cache_dtype or dt
    c, r, hi, di, k = d["kv_lora_rank"], d["qk_rope"], d["index_heads"], d["index_dim"], d["index_topk"]
    width = c + r + di
    context = [1, k - 1, k + 1, 3 * block_size + 5, 3000] if real else [1, k - 1, k + 3, 2 * block_size + 2]
    cache, table = _paged(inp, context, block_size, width, cache_dtype)
    lens = torch.tensor(context, dtype=torch.int32, device=dev)
    n = len(context)
    if "write_index_cache" in ops:
        slots = inp.randperm(cache.shape[0] * block_size)[: 4 * n]
        slots[inp.randperm(slots.numel())[:2]] = -1
        yield Case("write_index_cache", f"cache[{cache.shape[0]},{block_size},{width}] {slots.numel()} slots, some -1",
                   (cache.clone(), inp.randn(slots.numel(), di, dtype=dt), slots),
                   tolerance("write_latent_cache", dt, cache_dtype=setting.cache_dtype), compare_tensors, in_place=True)
    if "index_scores" in ops:
        yield Case("index_scores", f"q[{n},{hi},{di}] cache[{cache.shape[0]},{block_size},{width}] ctx{context}",
                   (inp.randn(n, hi, di, dtype=dt), inp.randn(n, hi) * hi ** -0.5, cache, table, lens),
                   tolerance("index_scores", dt), compare_scores)
    if "index_topk" in ops:
        positions = table.shape[1] * block_size
        scores = inp.randn(n, positions)
        scores = scores.masked_fill(torch.arange(positions, device=dev)[None, :] >= lens[:, None], float("-inf"))
        yield Case("index_topk", f"scores[{n},{positions}] k={k} ctx{context}", (scores, table, k), 0.0, compare_topk)
    if "sparse_mla" in ops:
        h = d["heads"]
        slots = torch.stack([inp.randperm(cache.shape[0] * block_size)[:k] for _ in range(n)])
        slots[0, 1:] = -1                                   # a first token sees only itself
        slots[-1, k // 2:] = -1
        yield Case("sparse_mla", f"q[{n},{h},{c}+{r}] slots[{n},{k}] cache[{cache.shape[0]},{block_size},{width}]",
                   (inp.randn(n, h, c, dtype=dt), inp.randn(n, h, r, dtype=dt), cache, slots, (d["qk_nope"] + r) ** -0.5),
                   tolerance("sparse_mla", dt), compare_tensors)


def compare_scores(out, ref, args) -> tuple[float, str, str]:
    """The -inf positions (past each context) must be exactly those of the reference; finite ones close."""
    problem = _shape_problem(out, ref)
    if problem:
        return float("inf"), problem, ""
    if not torch.equal(torch.isneginf(out), torch.isneginf(ref)):
        return float("inf"), "-inf where the reference has a score (or a score past a context)", ""
    finite = torch.isfinite(ref)
    return relative_error(out[finite].float(), ref[finite].float()), "", ""


def compare_topk(out, ref, args) -> tuple[float, str, str]:
    """Each row must hold the reference's slots (in any order) and its -1 padding."""
    problem = _shape_problem(out, ref)
    if problem:
        return float("inf"), problem, ""
    rows = (out.long().sort(-1).values != ref.long().sort(-1).values).any(-1).nonzero().flatten().tolist()
    if rows:
        return 1.0, f"row {rows[0]}: slots {sorted(out[rows[0]].tolist())}, reference {sorted(ref[rows[0]].tolist())}", ""
    return 0.0, "", ""


# -- running ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "synchronize") and device.type != "cpu":
        module.synchronize()


def _for_reference(args: tuple, in_place: bool) -> tuple:
    """Half-precision tensors upcast to float32 (same values); an in-place target gets its own copy."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)
                 else a.clone() if in_place and i == 0 else a for i, a in enumerate(args))


def run_case(case: Case, fn: Callable) -> OpResult:
    ref_args = _for_reference(case.args, case.in_place)
    args = tuple(a.clone() if case.in_place and i == 0 else a for i, a in enumerate(case.args))
    ref_out = getattr(reference, case.op)(*ref_args)
    if case.in_place:
        ref_out = ref_args[0]
    try:
        out = fn(*args)                      # warm-up (JIT compilation, autotuning); also the one compared
        _sync(args[0].device if isinstance(args[0], torch.Tensor) else torch.device("cpu"))
        start = time.perf_counter()
        fn(*args)
        _sync(args[0].device if isinstance(args[0], torch.Tensor) else torch.device("cpu"))
        seconds = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a failing op is a result, not a crash of the suite
        return OpResult(case.op, case.shape, None, case.tolerance, None, f"raised {type(e).__name__}: {e}")
    if case.in_place:
        out = args[0]
    error, problem, note = case.compare(out, ref_out, case.args)
    return OpResult(case.op, case.shape, error, case.tolerance, seconds, problem, note)


def check_ops(ops: dict[str, Callable], setting: CheckSetting, seed: int | None = None, real_shapes: bool = True,
              on_result: Callable[[OpResult], None] | None = None) -> list[OpResult]:
    """Run every op in `ops` ({name: callable}) against the reference; one OpResult per case."""
    seed = new_seed() if seed is None else seed
    results = []
    with torch.inference_mode():
        for case in cases(set(ops), setting, seed, real_shapes):
            fmt = weight_format_of(case)
            if fmt is not None and not handles_weight_format(ops[case.op], fmt):
                continue    # marked for other formats: the model runs the reference's op for this one
            result = run_case(case, ops[case.op])
            results.append(result)
            if on_result:
                on_result(result)
    return results


def weight_format_of(case: Case) -> str | None:
    """The weight format a linear / moe_experts case multiplies (None for ops without weights)."""
    if case.op == "linear":
        return case.args[1].format
    if case.op == "moe_experts":
        return case.args[3].gate.format
    return None


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# -- generation --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationResult:
    tokens: int              # generated tokens compared, all prompts together
    identical: int           # of them, equal to the reference's greedy tokens
    passed: bool
    detail: str


def check_generation(registry, profile, device: str | None = None, max_new_tokens: int = 12,
                     seed: int = 0, debug: bool = False, hf_config: dict | None = None) -> GenerationResult:
    """Greedy generation on a tiny random DeepSeek-V3 (every feature: MLA, grouped MoE, dense layer,
    YaRN; or the model of `hf_config`, e.g. synthetic.TINY_V32_CONFIG) through `profile`'s backend, against
    the reference backend in float32 with the same weights. At the first token where they differ, the
    reference's logits must show a near-tie (margin within the tolerance of the backend's precision);
    after it, sequences diverge legitimately."""
    from dsv3.llm import LLM
    from dsv3.core.profile import load_profile
    from dsv3.checkpoints.synthetic import TINY_CONFIG, random_checkpoint
    from dsv3.plugins.manager import create_registry

    overrides = {"device": device} if device else {}
    gen = torch.Generator().manual_seed(seed)
    vocab = (hf_config or TINY_CONFIG)["vocab_size"]
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (3, 17, 70)]
    quiet = lambda msg: None  # noqa: E731 - fallbacks were reported by the op checks already
    with tempfile.TemporaryDirectory(prefix="dsv3-check-") as tmp:
        random_checkpoint(tmp, hf_config, seed=seed)
        params = dict(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        warn, registry.warn = registry.warn, quiet
        try:
            llm = LLM(tmp, profile=_with(profile, overrides), registry=registry)
            outs, _ = llm.generate_ids(prompts, **params)
        except Dsv3Error:
            raise          # the user's setup (profile, device), not the backend's arithmetic
        except Exception as e:  # noqa: BLE001 - a backend that crashes mid-generation fails the check
            if debug:
                raise
            return GenerationResult(0, 0, False, f"generation through the backend raised {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''} (rerun with --debug for the traceback)")
        finally:
            registry.warn = warn
        ref_profile = _with(load_profile("cpu"), {"dtype": "float32", "weight_format": llm.weight_format,
                                                  "device": "cpu", "kv_cache.dtype": "auto"})
        ref = LLM(tmp, profile=ref_profile, registry=create_registry(autoload=False, entry_points=(), warn=quiet))
        ref_outs, _ = ref.generate_ids(prompts, **params)
        margin_tol = 4 * tolerance("linear", llm.dtype, llm.weight_format)
        total = identical = 0
        details = []
        for i, (prompt, out, ref_out) in enumerate(zip(prompts, outs, ref_outs)):
            total += len(ref_out)
            split = next((j for j, (a, b) in enumerate(zip(out, ref_out)) if a != b), None)
            if split is None:
                if len(out) != len(ref_out):
                    return GenerationResult(total, identical, False, f"prompt {i}: {len(out)} tokens, reference "
                                            f"{len(ref_out)}")
                identical += len(out)
                continue
            identical += split
            logits = ref.logits([prompt + out[:split]])[0, len(prompt) + split - 1]
            margin = (logits[ref_out[split]] - logits[out[split]]).item() / logits.abs().max().item()
            if margin > margin_tol:
                return GenerationResult(total, identical, False, (
                    f"prompt {i}, token {split}: backend chose {out[split]}, reference {ref_out[split]}; the "
                    f"reference prefers its token by {margin:.2e} of the logit scale (a near-tie would be "
                    f"<= {margin_tol:.1e})"))
            details.append(f"prompt {i} diverges at token {split} on a near-tie ({margin:.1e} <= {margin_tol:.1e})")
    detail = "; ".join(details) or "all greedy tokens identical"
    return GenerationResult(total, identical, True, detail)


def _with(profile, overrides: dict):
    from dsv3.core.profile import with_overrides
    return with_overrides(profile, overrides) if overrides else profile


# -- the whole suite and its report --------------------------------------------------------------------------

@dataclass
class CheckReport:
    backend: str
    setting: CheckSetting
    seed: int
    checked: dict[str, str]          # op -> plugin that provides it
    fallbacks: list[str]             # ops the backend does not provide (the reference runs them; not checked)
    results: list[OpResult]
    generation: GenerationResult | None = None

    @property
    def failed(self) -> list[OpResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed and (self.generation is None or self.generation.passed)


def check_backend(registry, profile, device: str | None = None, seed: int | None = None, real_shapes: bool = True,
                  generation: bool = True, only: list[str] | None = None,
                  on_result: Callable[[OpResult], None] | None = None, debug: bool = False) -> CheckReport:
    """The full suite for `profile.backend` as a registry resolves it: every op it provides (pins
    included) against the reference, then a tiny-model generation."""
    from dsv3.plugins.manager import plan_ops
    spec = registry.backend(profile.backend)
    plan = plan_ops(registry, spec.name, profile.ops)
    provided = {op: c for op, c in plan.items() if not c.fallback and (not only or op in only)}
    setting = CheckSetting.for_profile(profile, spec, device)
    seed = new_seed() if seed is None else seed
    results = check_ops({op: c.fn for op, c in provided.items()}, setting, seed, real_shapes, on_result)
    report = CheckReport(spec.name, setting, seed, {op: c.plugin for op, c in provided.items()},
                         [op for op, c in plan.items() if c.fallback], results)
    if generation:
        report.generation = check_generation(registry, profile, device, seed=seed % 1000, debug=debug)
        if set(SPARSE_OP_NAMES) & set(provided):   # the backend runs V3.2's sparse attention: generate with it too
            from dsv3.checkpoints.synthetic import TINY_V32_CONFIG
            v3, v32 = report.generation, check_generation(registry, profile, device, seed=seed % 1000, debug=debug,
                                                          hf_config=TINY_V32_CONFIG)
            report.generation = GenerationResult(v3.tokens + v32.tokens, v3.identical + v32.identical,
                                                 v3.passed and v32.passed, f"V3: {v3.detail}; V3.2: {v32.detail}")
    return report


def format_row(r: OpResult, widths=(18, 64)) -> str:
    error = "-" if r.error is None else ("inf" if r.error == float("inf") else f"{r.error:.2e}")
    seconds = "-" if r.seconds is None else f"{r.seconds * 1e3:9.2f}"
    status = "pass" if r.passed else "FAIL"
    line = f"{r.op:<{widths[0]}} {r.shape:<{widths[1]}} {error:>9} {r.tolerance:>9.2e} {status:>4} {seconds:>9}"
    extra = r.problem or r.note
    return line + (f"  {extra}" if extra else "")


def table_header(widths=(18, 64)) -> str:
    return (f"{'op':<{widths[0]}} {'shape':<{widths[1]}} {'max rel err':>9} {'tolerance':>9} {'ok':>4} {'ms':>9}\n"
            + "-" * (widths[0] + widths[1] + 46))


def format_table(results: list[OpResult]) -> str:
    return "\n".join([table_header()] + [format_row(r) for r in results])
