"""The ascend op table against the reference, with the EMULATED torch_npu installed; and the plugin.

Shapes are chosen to take the fused torch_npu paths (their documented constraints hold) and the
plain-torch fallbacks; the emulation's call log shows which kernel ran.
"""
import importlib
import sys

import pytest
import torch

from dsv3.backends.ascend import plugin
from dsv3.backends.ascend.emulation import install, kernels
from dsv3.backends.reference import ops as ref
from dsv3.plugins.conformance import CheckSetting, check_ops, format_table
from dsv3.core.errors import PluginError
from dsv3.core.ops import ExpertWeights, GateSpec
from dsv3.core.quant import quantize_int8_channel
from dsv3.core.weights import QuantWeight


@pytest.fixture
def ascend(monkeypatch):
    install(monkeypatch)
    monkeypatch.delitem(sys.modules, "dsv3.backends.ascend.ops", raising=False)
    ops = importlib.import_module("dsv3.backends.ascend.ops")
    kernels.CALL_LOG.clear()
    return ops


def called(name: str) -> int:
    return sum(1 for op, _, _ in kernels.CALL_LOG if op == name)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("fmt", ["int8-w8a8", "dense"])
def test_conformance_small_shapes(ascend, fmt):
    table = ascend.ascend_ops()
    setting = CheckSetting(torch.device("cpu"), torch.bfloat16, (fmt,))
    results = check_ops(table, setting, seed=1234, real_shapes=False)
    assert all(r.passed for r in results), format_table(results)


def _int8_stack(w):
    qs = [quantize_int8_channel(m) for m in w]
    return QuantWeight(torch.stack([q.data for q in qs]), torch.stack([q.scale for q in qs]), "int8-w8a8")


def test_w8a8_linear_uses_dynamic_quant_and_quant_matmul(ascend):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 256, generator=g), quantize_int8_channel(torch.randn(384, 256, generator=g) / 16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = ascend.linear(x.to(dtype), w)
        assert out.dtype == dtype and rel(out, ref.linear(x, w)) < 0.03
    assert called("npu_dynamic_quant") == 3 and called("npu_quant_matmul") == 3


def test_gate_fused_when_documented_limits_hold(ascend):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(20, 64, generator=g), torch.randn(64, 64, generator=g) / 8, 0.1 * torch.randn(64, generator=g)
    for norm in (True, False):
        spec = GateSpec(6, 8, 3, norm, 2.5)                  # 8 experts per group (> 2)
        wa, ia = ascend.moe_gate(x, w, b, spec)
        wr, ir = ref.moe_gate(x, w, b, spec)
        oa, orr = ia.sort(-1), ir.sort(-1)
        assert torch.equal(oa.values, orr.values)
        assert torch.allclose(wa.gather(1, oa.indices), wr.gather(1, orr.indices), rtol=1e-5)
    assert called("npu_moe_gating_top_k") == 2
    ascend.moe_gate(x, w[:8], b[:8], GateSpec(2, 4, 2, True, 1.0))   # 2 experts per group: plain torch
    assert called("npu_moe_gating_top_k") == 2


@pytest.mark.parametrize("fmt", ["int8-w8a8", "dense"])
def test_experts_grouped_gemms_with_expert_parallel_slice(ascend, fmt):
    g = torch.Generator().manual_seed(2)
    e, d, inter, t, k = 6, 128, 64, 11, 4
    raw = [torch.randn(e, inter, d, generator=g) / 11, torch.randn(e, inter, d, generator=g) / 11,
           torch.randn(e, d, inter, generator=g) / 8]
    ws = [_int8_stack(w) if fmt == "int8-w8a8" else QuantWeight(w.to(torch.bfloat16), None, "dense") for w in raw]
    ids = torch.stack([torch.randperm(12, generator=g)[:k] for _ in range(t)])   # experts 0..11; this rank 3..8
    weights = torch.rand(t, k, generator=g) + 0.1
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    experts = ExpertWeights(*ws, first_expert=3)
    out = ascend.moe_experts(x, weights, ids, experts)
    assert out.dtype == torch.bfloat16 and rel(out, ref.moe_experts(x.float(), weights, ids, experts)) < 0.05
    assert called("npu_moe_init_routing_v2") == 1 and called("npu_grouped_matmul") == 3
    none_held = ExpertWeights(*ws, first_expert=100)
    assert not ascend.moe_experts(x, weights, ids, none_held).any()


def test_mla_decode_fused_at_v3_head_shapes(ascend):
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(7, 128, 576, generator=g).to(torch.bfloat16)
    table = torch.tensor([[6, 2, 0], [1, 0, 0], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([257, 1, 300], dtype=torch.int32)
    ql = torch.randn(3, 32, 512, generator=g).to(torch.bfloat16)
    qr = torch.randn(3, 32, 64, generator=g).to(torch.bfloat16)
    out = ascend.mla_decode(ql, qr, cache, table, lens, 0.07)
    assert called("npu_fused_infer_attention_score") == 1
    assert rel(out, ref.mla_decode(ql.float(), qr.float(), cache.float(), table, lens, 0.07)) < 0.02
    ascend.mla_decode(ql[:, :4], qr[:, :4], cache, table, lens, 0.07)       # 4 heads: outside MLA mode
    assert called("npu_fused_infer_attention_score") == 1


def test_mla_prefill_fused_for_deepseek_head_dims(ascend):
    g = torch.Generator().manual_seed(4)
    cu_q, cu_k = torch.tensor([0, 6, 7, 10], dtype=torch.int32), torch.tensor([0, 6, 15, 18], dtype=torch.int32)
    q = torch.randn(10, 8, 192, generator=g).to(torch.bfloat16)
    k = torch.randn(18, 8, 192, generator=g).to(torch.bfloat16)
    v = torch.randn(18, 8, 128, generator=g).to(torch.bfloat16)
    prefill = ascend.make_mla_prefill()
    out = prefill(q, k, v, cu_q, cu_k, 0.07)
    assert called("npu_fused_infer_attention_score") == 1
    assert rel(out, ref.mla_prefill(q.float(), k.float(), v.float(), cu_q, cu_k, 0.07)) < 0.02
    prefill(q.float(), k.float(), v.float(), cu_q, cu_k, 0.07)               # float32: the mode is bf16 only
    assert called("npu_fused_infer_attention_score") == 1


def test_norms_call_npu_kernels(ascend):
    x, r = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(ascend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    y, h = ascend.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, x + r) and torch.equal(y, ref.rms_norm(x + r, w, 1e-6))
    assert called("npu_rms_norm") == 1 and called("npu_add_rms_norm") == 1


# --- plugin ---------------------------------------------------------------------------------------
def test_emulation_must_be_declared(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", kernels)
    monkeypatch.delenv(plugin.EMULATION_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "dsv3.backends.ascend.ops", raising=False)
    ops = importlib.import_module("dsv3.backends.ascend.ops")
    with pytest.raises(PluginError, match="emulation"):
        ops.ascend_ops()


def test_probe_and_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", kernels)
    monkeypatch.setenv(plugin.EMULATION_ENV, "1")
    assert plugin.probe() is None
    monkeypatch.delenv(plugin.EMULATION_ENV)
    monkeypatch.setenv("ASCEND_HOME_PATH", "/usr/local/Ascend/ascend-toolkit/latest")
    monkeypatch.setenv(plugin.VISIBLE_ENV, "")
    assert "empty" in plugin.probe()
    monkeypatch.setenv(plugin.VISIBLE_ENV, "4,5")
    assert plugin.probe() is None and plugin.visible_devices() == [4, 5]
    assert plugin.device_for_rank(1) == "npu:1"
    with pytest.raises(ValueError, match="2 visible"):
        plugin.device_for_rank(2)


def test_validate_profile_device_rules(monkeypatch):
    from dsv3.core.profile import load_profile, with_overrides
    prof = load_profile("ascend-w8a8")
    monkeypatch.delenv(plugin.EMULATION_ENV, raising=False)
    monkeypatch.setenv(plugin.VISIBLE_ENV, "0,1")
    assert plugin.dsv3_validate_profile(prof) == []
    assert "npu:0..npu:1" in plugin.dsv3_validate_profile(with_overrides(prof, {"device": "npu:2"}))[0]
    assert "emulation" in plugin.dsv3_validate_profile(with_overrides(prof, {"device": "cpu"}))[0]
    monkeypatch.setenv(plugin.EMULATION_ENV, "1")
    assert "device: cpu" in plugin.dsv3_validate_profile(prof)[0]
    assert plugin.dsv3_validate_profile(with_overrides(prof, {"device": "cpu"})) == []
    assert plugin.dsv3_distributed_backend("ascend") == "hccl"
