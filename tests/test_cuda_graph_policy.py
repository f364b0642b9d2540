"""When the cuda backend's CUDA-graph runner declines to capture (no GPU needed: the decision reads
only the op table's providers and the weight format)."""
from types import SimpleNamespace

from dsv3.backends.nvidia.graphs import capture_blockers


def fake_model(weight_format="fp8-block", experts=8, **providers):
    table = {"mla_decode": "cuda", "moe_experts": "cuda", **providers}
    return SimpleNamespace(ops=SimpleNamespace(providers=table), weight_format=weight_format,
                           cfg=SimpleNamespace(n_routed_experts=experts))


def test_fp8_model_with_cuda_ops_is_captured():
    assert capture_blockers(fake_model()) == []


def test_dense_moe_runs_eagerly():          # the cuda-bf16 profile: dense experts take the reference loop
    (reason,) = capture_blockers(fake_model("dense"))
    assert "moe_experts" in reason and "dense" in reason
    assert capture_blockers(fake_model("dense", experts=0)) == []   # no MoE layers: nothing synchronises


def test_reference_fallbacks_that_sync_block_capture():
    reasons = capture_blockers(fake_model(mla_decode="cpu (reference fallback)"))
    assert len(reasons) == 1 and reasons[0].startswith("mla_decode")
