"""The conformance suite: the harness covers every op and measures what it says, correct low-precision
backends pass within their stated tolerances, and every kind of wrong op is caught and named. (The
reference itself is checked against independent oracles in tests/test_reference_oracle.py.)"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dsv3.backends.reference import ops as reference
from dsv3.commands.main import main
from dsv3.plugins.conformance import CheckSetting, check_ops, format_table, tolerance
from dsv3.core.ops import OP_NAMES, ExpertWeights
from dsv3.core.quant import quantize_act_fp8, quantize_act_int8
from dsv3.core.weights import dequantize

import test_reference_oracle as oracle

CPU = torch.device("cpu")


def failed(results) -> set[str]:
    return {r.op for r in results if not r.passed}


FORMATS = ("dense", "fp8-block", "fp8-fnuz", "int8-w8a8")


def test_the_harness_covers_every_op_in_every_format_and_reports_zero_for_the_reference_itself():
    """This checks the harness, not the reference: every op of the contract gets cases, linear and
    moe_experts in every weight format, and the reference run against itself reports error 0 (the
    harness copies in-place targets, feeds both sides the same inputs, compares the right outputs).
    Whether the reference is right is tests/test_reference_oracle.py's job: each op against an
    independent float64 oracle."""
    results = check_ops(reference.OPS, CheckSetting(CPU, torch.float32, FORMATS), real_shapes=False)
    assert {r.op for r in results} == set(OP_NAMES)
    for op in ("linear", "moe_experts"):
        assert all(any(r.op == op and f" {fmt}" in r.shape for r in results) for fmt in FORMATS), format_table(results)
    assert all(r.passed and r.error == 0 for r in results), format_table(results)


def test_formats_an_op_leaves_to_the_reference_are_not_put_to_it():
    """A moe_experts marked for FP8 only (the Triton backends' fused MoE) is never called with dense experts:
    the model runs the reference's loop for those (plugins.manager.plan_ops), so check does not count them
    against the backend; its FP8 cases still run."""
    from dsv3.core.ops import for_weight_formats
    seen = []

    @for_weight_formats("fp8-block")
    def fp8_only(x, w, ids, experts):
        seen.append(experts.gate.format)
        assert experts.gate.format == "fp8-block", "called with a format it does not handle"
        return reference.moe_experts(x, w, ids, experts)
    results = check_ops({"moe_experts": fp8_only}, CheckSetting(CPU, torch.float32, ("dense", "fp8-block")),
                        real_shapes=False)
    assert results and all(r.passed for r in results), format_table(results)
    assert seen and set(seen) == {"fp8-block"}
    assert not any(" dense" in r.shape for r in results)


@pytest.mark.parametrize("op", ["rms_norm", "rope", "linear", "silu_mul", "mla_prefill", "mla_decode", "moe_experts"])
def test_the_harness_error_is_the_max_difference_over_the_max_of_the_reference(op):
    """An op whose outputs are all off by a factor 1 + d is reported with error d, and fails."""
    d = 1e-3
    results = check_ops({op: lambda *args: getattr(reference, op)(*args) * (1 + d)}, CheckSetting(CPU),
                        real_shapes=False)
    assert results and all(abs(r.error - d) <= 1e-3 * d and not r.passed for r in results), format_table(results)


def _bf16_accumulation(terms):
    """terms [..., n] -> their running sum with every partial sum rounded to bf16 (no float32 accumulator)."""
    acc = torch.zeros(terms.shape[:-1], dtype=torch.bfloat16)
    for i in range(terms.shape[-1]):
        acc = (acc.float() + terms[..., i].float()).bfloat16()
    return acc


def _bf16_case(op, g):
    """(bf16 args, their float64 oracle, a sloppier bf16 variant of op or None) from the oracle file."""
    bf16 = torch.bfloat16
    if op == "rms_norm":   # width 2048: bf16 statistics stagnate once the running sum of squares is large
        x, w = oracle.randn(g, 7, 2048, std=3.0).to(bf16), (1 + 0.1 * oracle.randn(g, 2048)).to(bf16)

        def bf16_statistics(x, weight, eps):
            mean_sq = _bf16_accumulation(x.float().pow(2).to(bf16)).float() / x.shape[-1]
            return (x.float() * torch.rsqrt(mean_sq + eps)[:, None] * weight.float()).to(bf16)
        return (x, w, 1e-6), oracle.rms_norm64(x, w, 1e-6), bf16_statistics
    if op == "linear":     # K 2048: a bf16 accumulator loses ~sqrt(K) half-ulps of the running sum
        x, w = oracle.randn(g, 7, 2048).to(bf16), oracle.random_weight(g, 136, 2048, "dense")
        w = replace(w, data=w.data.to(bf16))

        def bf16_accumulator(x, w):
            return _bf16_accumulation(x.float()[:, None, :] * w.data.float()[None])
        return (x, w), oracle.linear64(x, w), bf16_accumulator
    if op == "rope":
        x, *rest = oracle.rope_inputs(g)
        return (x.to(bf16), *rest), oracle.rope64(x.to(bf16), *rest), None
    if op == "silu_mul":
        gate, up = oracle.randn(g, 7, 136, std=3.0).to(bf16), oracle.randn(g, 7, 136).to(bf16)
        return (gate, up), oracle.silu64(gate) * up.double(), None
    if op == "mla_prefill":
        args = oracle.prefill_inputs(g, *oracle.PREFILL_LENS, dtype=bf16)
        return args, oracle.prefill64(*args[:3], *oracle.PREFILL_LENS, args[5]), None
    if op == "mla_decode":
        args = oracle.decode_inputs(g, oracle.DECODE_CONTEXT, dtype=bf16)
        return args, oracle.decode64(*args), None
    if op == "moe_experts":
        x, weights, ids, experts = oracle.expert_inputs(g, "dense", None)
        experts = ExpertWeights(*(replace(w, data=w.data.to(bf16)) for w in (experts.gate, experts.up, experts.down)),
                                experts.first_expert)
        return (x.to(bf16), weights, ids, experts), oracle.experts64(x.to(bf16), weights, ids, experts), None
    raise ValueError(op)


@pytest.mark.parametrize("op", ["rms_norm", "rope", "linear", "silu_mul", "mla_prefill", "mla_decode", "moe_experts"])
def test_bf16_arithmetic_passes_bf16_tolerances(op):
    """The reference ops run in bf16 are a correct bf16 backend: against the float64 oracle (on the same
    bf16 inputs) they err by about one bf16 rounding of the output (measured 0.0017-0.006), within the
    harness's bf16 tolerance (2 eps = 2^-6, see `tolerance`) and well above float32's; a sloppier bf16
    backend (partial sums rounded to bf16: measured 0.08-0.27 at these widths) exceeds it."""
    seed, g = oracle.fresh_seed()
    args, expected, sloppy = _bf16_case(op, g)
    tol = tolerance(op, torch.bfloat16)
    err = oracle.rel_err(getattr(reference, op)(*args), expected)
    floor = torch.finfo(torch.bfloat16).eps / 16
    assert floor < err <= tol, f"{op} in bf16: error {err:.2e} outside ({floor:.1e}, {tol:.2e}] (seed {seed})"
    if sloppy is not None:
        sloppy_err = oracle.rel_err(sloppy(*args), expected)
        assert sloppy_err > tol, f"{op} with bf16 partial sums: error {sloppy_err:.2e} <= {tol:.2e} (seed {seed})"


def quantising_linear(x, w, honour_ue8m0=True):
    """What an FP8 / W8A8 backend does: quantise activations dynamically, multiply, rescale."""
    if w.format.startswith("fp8"):
        q, s = quantize_act_fp8(x, dtype=torch.float8_e4m3fnuz if w.format == "fp8-fnuz" else torch.float8_e4m3fn,
                                ue8m0=honour_ue8m0 and w.act_scale_fmt == "ue8m0")
        xq = q.float() * s.repeat_interleave(128, dim=-1)[:, : x.shape[-1]]
    elif w.format == "int8-w8a8":
        q, s = quantize_act_int8(x)
        xq = q.float() * s.unsqueeze(-1)
    else:
        xq = x.float()
    return F.linear(xq, dequantize(w)).to(x.dtype)


@pytest.mark.parametrize("fmt", ["fp8-block", "int8-w8a8"])
def test_activation_quantisation_passes_the_quantised_tolerance_but_not_the_dense_one(fmt):
    results = check_ops({"linear": quantising_linear}, CheckSetting(CPU, torch.float32, (fmt,)), real_shapes=False)
    assert not failed(results), format_table(results)
    worst = max(r.error for r in results)
    assert worst > 100 * tolerance("linear", torch.float32, "dense")   # the quantisation error is real ...
    # ... and the bound leaves a margin (measured up to 0.58x of it for fp8 at these small shapes)
    assert worst < 0.75 * tolerance("linear", torch.float32, fmt)


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-fnuz"])
def test_ue8m0_cases_catch_a_backend_that_ignores_the_activation_scale_format(fmt):
    setting = CheckSetting(CPU, torch.float32, (fmt,))
    honest = check_ops({"linear": quantising_linear}, setting, real_shapes=False)
    ue8m0 = [r for r in honest if "ue8m0" in r.shape]
    assert ue8m0 and not failed(honest), format_table(honest)
    assert max(r.error for r in ue8m0) < 1e-5          # same quantisation as the reference's emulation
    sloppy = check_ops({"linear": lambda x, w: quantising_linear(x, w, honour_ue8m0=False)}, setting,
                       real_shapes=False)
    assert [r.shape for r in sloppy if not r.passed] == [r.shape for r in ue8m0], format_table(sloppy)


def wrong(op):
    """Plausible bugs, one per op: each must be caught."""
    def rms_norm_without_weight(x, weight, eps):
        return reference.rms_norm(x, torch.ones_like(weight), eps)

    def add_rms_norm_returning_normed_residual(x, residual, weight, eps):
        normed, h = reference.add_rms_norm(x, residual, weight, eps)
        return normed, normed

    def rope_half_split(x, positions, cos, sin):   # NeoX halves instead of DeepSeek's interleaved pairs
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    def linear_ignoring_scales(x, w):
        return F.linear(x.float(), w.data.float()).to(x.dtype)

    def silu_mul_swapped(gate, up):
        return F.silu(up) * gate

    def quantize_act_per_tensor(x, dtype, ue8m0):
        q, s = reference.quantize_act(x, dtype, ue8m0)
        return q, s.amax().expand_as(s).contiguous()

    def cache_write_off_by_one(cache, latent, k_rope, slots):
        reference.write_latent_cache(cache, latent, k_rope, slots + 1)

    def prefill_without_causal_mask(q, k, v, cu_q, cu_k, scale):
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for b in range(len(cu_q) - 1):
            qb, kb, vb = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
            p = (torch.einsum("qhd,khd->hqk", qb.float(), kb.float()) * scale).softmax(-1)
            out[cu_q[b]:cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", p, vb.float()).to(q.dtype)
        return out

    def decode_reading_whole_blocks(q_latent, q_rope, cache, block_table, context_lens, scale):
        block = cache.shape[1]
        return reference.mla_decode(q_latent, q_rope, cache, block_table, (context_lens + block - 1) // block * block,
                                    scale)

    def gate_without_groups(x, weight, bias, spec):
        from dataclasses import replace
        return reference.moe_gate(x, weight, bias, replace(spec, n_group=1, topk_group=1))

    def experts_ignoring_first_expert(x, topk_weights, topk_ids, experts):
        from dataclasses import replace
        return reference.moe_experts(x, topk_weights, topk_ids, replace(experts, first_expert=0))

    def embedding_off_by_one(ids, weight):
        return F.embedding((ids + 1) % weight.shape[0], weight)

    return locals()[{
        "rms_norm": "rms_norm_without_weight", "add_rms_norm": "add_rms_norm_returning_normed_residual",
        "rope": "rope_half_split", "linear": "linear_ignoring_scales", "silu_mul": "silu_mul_swapped",
        "quantize_act": "quantize_act_per_tensor", "write_latent_cache": "cache_write_off_by_one",
        "mla_prefill": "prefill_without_causal_mask", "mla_decode": "decode_reading_whole_blocks",
        "moe_gate": "gate_without_groups", "moe_experts": "experts_ignoring_first_expert",
        "embedding": "embedding_off_by_one"}[op]]


@pytest.mark.parametrize("op", OP_NAMES)
def test_each_kind_of_wrong_op_is_caught(op):
    results = check_ops({op: wrong(op)}, CheckSetting(CPU, torch.float32, ("fp8-block",)), real_shapes=False)
    assert failed(results) == {op}, format_table(results)


def test_an_op_that_raises_or_returns_the_wrong_shape_fails_with_the_reason():
    def raising(x, weight, eps):
        raise RuntimeError("kernel launch failed")

    results = check_ops({"rms_norm": raising, "silu_mul": lambda gate, up: gate[:, :-1]},
                        CheckSetting(CPU), real_shapes=False)
    problems = {}
    for r in results:
        problems.setdefault(r.op, r.problem)
    assert problems["rms_norm"] == "raised RuntimeError: kernel launch failed"
    assert problems["silu_mul"].startswith("shape [7, 135], expected [7, 136]")


def test_gate_near_ties_are_tolerated_but_not_wrong_choices():
    """A backend whose router GEMM rounds to bf16 may flip near-tied experts; that is not an error."""
    def bf16_logits_gate(x, weight, bias, spec):
        return reference.moe_gate(x.bfloat16().float(), weight.bfloat16().float(), bias, spec)

    results = check_ops({"moe_gate": bf16_logits_gate}, CheckSetting(CPU, torch.bfloat16), real_shapes=False)
    assert not failed(results), format_table(results)


def test_check_command_passes_on_cpu(capsys):
    assert main(["check", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "tolerance" in out and "ms" in out
    assert "mla_decode         q[6,128,512+64]" in out            # DeepSeek-V3's real shapes are in the table
    # V3 and, since the cpu backend provides the sparse-attention ops, V3.2: 36 tokens each
    assert "generation: 72/72 greedy tokens identical to the reference" in out and "\nPASS: " in out
    assert "index_topk" in out and "sparse_mla" in out


def test_check_command_names_the_wrong_op_of_a_plugin(tmp_path, monkeypatch, capsys):
    (tmp_path / "sloppy_rms_norm.py").write_text(
        "from dsv3.plugins import hookimpl\n"
        "from dsv3.backends.reference import ops\n"
        "def rms_norm(x, weight, eps):\n"
        "    return ops.rms_norm(x, weight, eps) * 1.01\n"
        "@hookimpl\n"
        "def dsv3_backend_ops(backend):\n"
        "    return {'rms_norm': rms_norm} if backend == 'cpu' else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "--backend", "cpu", "--quick", "--plugin", "sloppy_rms_norm"]) == 1
    captured = capsys.readouterr()
    assert "rms_norm           x[7,200]" in captured.out and "FAIL" in captured.out
    assert "FAIL: op(s) rms_norm" in captured.err
    assert "ops by plugin: " in captured.out and "rms_norm=sloppy_rms_norm" in captured.out


def test_check_refuses_absent_hardware_unless_a_device_is_given(capsys):
    assert main(["check", "--backend", "cuda", "--quick"]) == 2
    assert "backend 'cuda' cannot run here" in capsys.readouterr().err


def test_a_backend_that_crashes_during_generation_fails_the_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "crashing_decode.py").write_text(
        "from dsv3.plugins import hookimpl\n"
        "def mla_decode(*args):\n"
        "    raise RuntimeError('operation not permitted when stream is capturing')\n"
        "@hookimpl\n"
        "def dsv3_backend_ops(backend):\n"
        "    return {'mla_decode': mla_decode} if backend == 'cpu' else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "--backend", "cpu", "--quick", "--ops", "rope", "--plugin", "crashing_decode"]) == 1
    captured = capsys.readouterr()
    assert ("generation: 0/0 greedy tokens identical to the reference; generation through the backend raised "
            "RuntimeError: operation not permitted when stream is capturing") in captured.out
    assert "FAIL: generation" in captured.err
