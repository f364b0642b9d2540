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


# -- the runner's host logic, with capture emulated on the CPU ------------------------------------------

def emulate_capture(monkeypatch):
    """CudaGraphRunner without a GPU: a capture runs the forward on its static buffers (as the real
    warm-up does) and a replay runs it again on them, so what the runner does on the host (buckets,
    padding rows, stale rows of the static buffers, which batches replay) runs exactly as on the GPU."""
    import contextlib

    import torch

    from dsv3.backends.nvidia import graphs

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args):
            pass

    for name, value in (("Stream", Stub), ("stream", lambda s: contextlib.nullcontext()), ("current_stream", Stub),
                        ("CUDAGraph", Stub), ("graph", lambda g, pool=None: contextlib.nullcontext()),
                        ("graph_pool_handle", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    capture = graphs._GraphSet._capture

    def emulated(self, bucket, caches, extra):
        capture(self, bucket, caches, extra)
        _, static, static_extra, out = self.graphs[bucket]

        class Replay:
            @staticmethod
            def replay():
                out.copy_(self.fn(static, caches, static_extra))
        self.graphs[bucket] = (Replay(), static, static_extra, out)
    monkeypatch.setattr(graphs._GraphSet, "_capture", emulated)


def test_speculative_verify_and_draft_through_graph_buckets_on_the_cpu(tmp_path, monkeypatch):
    """Issue 18's host side: greedy MTP speculation with oracle drafts through the graph runner (verify
    chunks of 2..64 tokens: buckets 2..64 with padding rows, the drafter's graphs too) gives plain
    greedy's output and k + 1 tokens per verify step at every batch 1..16 and k 1..3."""
    import torch

    from dsv3.backends.nvidia.graphs import CudaGraphRunner
    from dsv3.backends.reference.ops import OPS
    from dsv3.checkpoints.synthetic import TINY_CONFIG, random_checkpoint
    from dsv3.core.cache import LatentCache
    from dsv3.core.config import ModelConfig
    from dsv3.core.loader import Checkpoint, load_weights
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    from helpers import oracle_speculation_failures
    emulate_capture(monkeypatch)
    path = random_checkpoint(tmp_path / "tiny", seed=5)
    cfg = ModelConfig.from_hf(TINY_CONFIG)
    model = DeepseekV3(cfg, Ops.from_mapping(OPS, {n: "cpu" for n in OPS}), "dense", torch.float32)
    load_weights(model, Checkpoint(path))
    bs, new, ks = 8, 4, (1, 2, 3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, cfg.vocab_size, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    max_context = 30 + new + 8
    cache = LatentCache(model.num_cache_layers, 16 * -(-max_context // bs), bs, cfg.latent_dim, torch.float32, "cpu")
    runner = CudaGraphRunner(model, bs, max_context)

    with torch.inference_mode():
        failures = oracle_speculation_failures(model, cache, runner, prompts, new, ks, 2048, monkeypatch)
    assert {32, 64} <= set(runner.graphs) and 32 in runner.draft.graphs
    assert not failures, "\n".join(failures)


def test_a_v32_model_with_a_host_syncing_sparse_op_runs_eagerly():
    """A V3.2 decode step also calls the sparse-attention ops: the reference's write_index_cache (a
    boolean index) blocks capture; a dense-attention model does not call it."""
    ops = cuda_table(pins={"write_index_cache": "cpu"})
    v32 = SimpleNamespace(ops=ops, cfg=SimpleNamespace(n_routed_experts=8, sparse_attention=True))
    (reason,) = capture_blockers(v32)
    assert reason.startswith("write_index_cache (cpu)")
    assert capture_blockers(model(ops)) == []
