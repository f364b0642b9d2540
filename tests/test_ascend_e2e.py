"""Tiny-model runs through dsv3.LLM on the ascend backend with the EMULATED torch_npu, on CPU.

The model keeps DeepSeek-V3's per-head widths (32 heads, latent 512, nope 128, rope 64, v 128) and
16 experts in 4 groups so that every fused kernel's documented constraints hold and the fused
paths run (the call log proves it); only hidden size, layers and vocabulary are tiny.

Measured (3 seeds, max|logits - fp32 reference| / max|fp32 reference| over all prompt positions):
W8A8 0.020-0.035; BF16 0.012-0.022, identical to the reference backend run in bfloat16. Bounds below:
W8A8 <= 0.06, BF16 <= 0.04.
"""
from collections import Counter

import pytest
import torch

from dsv3 import LLM
from dsv3.backends.ascend.emulation import install, kernels
from helpers import make_checkpoint, tiny_config

ASCEND_TINY = tiny_config(num_attention_heads=32, num_key_value_heads=32, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_group=4, topk_group=2)
PROMPTS = [list(range(2, 40)), list(range(100, 107))]
BOUND = {"ascend-w8a8": 0.06, "ascend-bf16": 0.04}
OVERRIDES = {"device": "cpu", "kv_cache.max_tokens": 1024}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ascend-tiny")
    make_checkpoint(path, ASCEND_TINY, seed=0, std=0.05)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    llm = LLM(checkpoint, backend="cpu")                      # float32, dense weights
    return llm.logits(PROMPTS)


def _error(logits, ref):
    mask = torch.zeros_like(ref, dtype=torch.bool)
    for i, p in enumerate(PROMPTS):
        mask[i, :len(p)] = True
    return ((logits - ref).abs()[mask].max() / ref.abs()[mask].max()).item()


@pytest.mark.parametrize("profile", ["ascend-w8a8", "ascend-bf16"])
def test_generation_and_logits_bound(monkeypatch, checkpoint, reference, profile):
    install(monkeypatch)
    ref_logits = reference
    llm = LLM(checkpoint, profile=profile, **OVERRIDES)
    assert llm.device.type == "cpu" and llm.spec.name == "ascend" and llm.dtype == torch.bfloat16
    kernels.CALL_LOG.clear()
    error = _error(llm.logits(PROMPTS), ref_logits)
    assert error <= BOUND[profile], f"{profile}: logits off by {error:.3f} of their scale"
    tokens, _ = llm.generate_ids(PROMPTS, max_new_tokens=6)     # prefill, then decode over the paged cache
    assert [len(t) for t in tokens] == [6, 6]
    assert all(0 <= tok < ASCEND_TINY["vocab_size"] for t in tokens for tok in t)
    calls = Counter(op for op, _, _ in kernels.CALL_LOG)
    fused = {"npu_fused_infer_attention_score", "npu_moe_gating_top_k", "npu_moe_init_routing_v2",
             "npu_grouped_matmul", "npu_rms_norm", "npu_add_rms_norm"}
    if profile == "ascend-w8a8":
        fused |= {"npu_dynamic_quant", "npu_quant_matmul"}
        assert llm.weight_format == "int8-w8a8"
    assert fused <= set(calls), f"fused kernels not called: {fused - set(calls)}"
    decode_calls = [c for c in kernels.CALL_LOG if c[0] == "npu_fused_infer_attention_score" and "query_rope" in c[2]]
    assert decode_calls, "MLA decode did not go through npu_fused_infer_attention_score"
