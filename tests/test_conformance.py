"""The conformance suite: the reference passes, correct low-precision backends pass within their stated
tolerances, and every kind of wrong op is caught and named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.backends.reference import ops as reference
from dsv3.commands.main import main
from dsv3.plugins.conformance import CheckSetting, check_ops, format_table, tolerance
from dsv3.core.ops import OP_NAMES
from dsv3.core.quant import quantize_act_fp8, quantize_act_int8
from dsv3.core.weights import dequantize

CPU = torch.device("cpu")


def failed(results) -> set[str]:
    return {r.op for r in results if not r.passed}


def test_reference_passes_every_op_at_small_shapes_in_every_format():
    results = check_ops(reference.OPS, CheckSetting(CPU, torch.float32, ("dense", "fp8-block", "fp8-fnuz", "int8-w8a8")),
                        real_shapes=False)
    assert {r.op for r in results} == set(OP_NAMES)
    assert not failed(results), format_table(results)
    assert all(r.error == 0 for r in results)


def test_bf16_arithmetic_passes_bf16_tolerances():
    """The reference ops run in bf16 are a correct bf16 backend: they must pass, and not trivially."""
    results = check_ops(reference.OPS, CheckSetting(CPU, torch.bfloat16, ("dense",)), real_shapes=False)
    assert not failed(results), format_table(results)
    assert max(r.error for r in results if r.op == "linear") > 1e-4


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
    assert "generation: 36/36 greedy tokens identical to the reference" in out and "\nPASS: " in out


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
