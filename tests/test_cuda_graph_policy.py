"""When the cuda backend's CUDA-graph runner declines to capture. No GPU needed: the decision reads the
op table the model is built with (the real cuda table, resolved for the weight format) and what each op
declares of itself (dsv3.core.ops.host_syncing / for_weight_formats)."""
from types import SimpleNamespace

import pytest
import torch

from dsv3.backends.nvidia.graphs import capture_blockers
from dsv3.backends.reference import ops as reference
from dsv3.core.errors import PluginError
from dsv3.core.ops import handles_weight_format, syncs_with_host
from dsv3.plugins.manager import create_registry, for_weight_format, resolve_ops

pytest.importorskip("triton")


def cuda_table(weight_format="fp8-block", pins=None, warnings=None):
    reg = create_registry(entry_points=(), warn=(warnings.append if warnings is not None else lambda m: None))
    ops = resolve_ops(reg, "cuda", pins)
    return for_weight_format(ops, weight_format, reg.warn)


def model(ops, experts=8):
    return SimpleNamespace(ops=ops, cfg=SimpleNamespace(n_routed_experts=experts))


def test_fp8_model_with_cuda_ops_is_captured():
    assert capture_blockers(model(cuda_table())) == []


def test_dense_moe_is_chosen_at_build_time_and_runs_eagerly():   # the cuda-bf16 profile
    warnings = []
    ops = cuda_table("dense", warnings=warnings)
    assert ops.moe_experts is reference.moe_experts and "dense" in ops.providers["moe_experts"]
    assert any("moe_experts" in w and "'dense'" in w for w in warnings)
    (reason,) = capture_blockers(model(ops))
    assert reason.startswith("moe_experts") and "synchronises with the host" in reason
    assert capture_blockers(model(ops, experts=0)) == []   # no MoE layers: nothing synchronises
    assert cuda_table("fp8-block").moe_experts is not reference.moe_experts


def test_strict_profile_refuses_the_build_time_fallback():
    reg = create_registry(entry_points=(), warn=lambda m: None)
    with pytest.raises(PluginError, match=r"moe_experts .* does not run 'dense' weights and the profile is strict"):
        for_weight_format(resolve_ops(reg, "cuda"), "dense", reg.warn, strict=True)


def test_pinned_reference_ops_that_sync_block_capture():
    reasons = capture_blockers(model(cuda_table(pins={"mla_decode": "cpu"})))
    assert len(reasons) == 1 and reasons[0].startswith("mla_decode (cpu)")


def test_what_the_reference_declares():
    syncing = {op for op, fn in reference.OPS.items() if syncs_with_host(fn)}
    assert syncing == {"write_latent_cache", "mla_prefill", "mla_decode", "moe_experts"}
    assert all(handles_weight_format(fn, "int8-w8a8") for fn in reference.OPS.values())


def test_the_reference_cache_write_skips_negative_slots():
    cache = torch.randn(3, 4, 6)
    before = cache.clone()
    latent, rope = torch.randn(3, 4), torch.randn(3, 2)
    reference.write_latent_cache(cache, latent, rope, torch.tensor([5, -1, 0]))
    flat, old = cache.view(-1, 6), before.view(-1, 6)
    assert torch.equal(flat[5], torch.cat((latent[0], rope[0]))) and torch.equal(flat[0], torch.cat((latent[2], rope[2])))
    assert torch.equal(flat[1:5], old[1:5]) and torch.equal(flat[6:], old[6:])   # slot -1 wrote nothing


def test_conformance_catches_a_cache_write_that_wraps_negative_slots():
    from dsv3.plugins.conformance import CheckSetting, check_ops

    def python_indexing(cache, latent, k_rope, slots):     # slot -1 lands on the last row of the cache
        cache.view(-1, cache.shape[-1])[slots] = torch.cat((latent, k_rope), dim=-1).to(cache.dtype)

    results = check_ops({"write_latent_cache": python_indexing}, CheckSetting(torch.device("cpu")), real_shapes=False)
    assert results and not any(r.passed for r in results)
