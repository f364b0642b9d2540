"""The op table built from the shared Triton kernels for one target (cuda, gfx942, gfx950).

`make_ops(target)` returns {op name: callable} in the signatures of dsv3.core.ops.OpSpecs. The
NVIDIA backend adds its cuBLAS dispatch for large-M FP8 GEMMs on top (dsv3.backends.nvidia.ops).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from dsv3.backends.triton import dsa, elementwise, gate, mla, moe, norm
from dsv3.backends.triton.gemm import fp8_gemm
from dsv3.backends.triton.quant import act_quant
from dsv3.backends.triton.tuning import QUANT_IN_GEMM_MAX_M, Target, gemm_config
from dsv3.core.ops import for_weight_formats
from dsv3.core.quant import FP8_MAX
from dsv3.core.weights import QuantWeight

FP8_FORMATS = ("fp8-block", "fp8-fnuz")
def triton_linear(target: Target, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """FP8 block-scaled linear through the Triton GEMM alone (what AMD runs; NVIDIA below its cuBLAS threshold).
    The activation is quantised per 1x128 group in the weight's FP8 dtype (fnuz's max on MI300), with
    power-of-two scales when the weight says so (`w.act_scale_fmt`, V3.1)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n = w.out_features
    cfg = gemm_config(target, m, n, k)
    fmax, ue8m0 = FP8_MAX[w.data.dtype], w.ue8m0_acts
    if m <= QUANT_IN_GEMM_MAX_M or target.batch_invariant:   # quantised inside the GEMM: one launch
        y = fp8_gemm(x2 if x2.stride(-1) == 1 else x2.contiguous(), None, w.data, w.scale, x.dtype, cfg,
                     ue8m0=ue8m0, fp8_max=fmax, launch_pdl=target.pdl)
    else:
        xq, xs = act_quant(x2, w.data.dtype, ue8m0, launch_pdl=target.pdl)
        y = fp8_gemm(xq, xs, w.data, w.scale, x.dtype, cfg, fp8_max=fmax, launch_pdl=target.pdl)
    return y.view(*shape[:-1], n)


def make_ops(target: Target, fp8_linear=None) -> dict:
    """The shared op table. `fp8_linear(x, w)` overrides the FP8 GEMM dispatch (NVIDIA's cuBLAS/Triton choice)."""
    fp8_linear = fp8_linear or (lambda x, w: triton_linear(target, x, w))

    def linear(x, w: QuantWeight):
        if w.format in FP8_FORMATS:
            return fp8_linear(x, w)
        if w.format == "dense":   # BF16 GEMM: cuBLAS / hipBLASLt already run these at the floor
            return F.linear(x, w.data if w.data.dtype == x.dtype else w.data.to(x.dtype))
        raise ValueError(f"backend {target.name!r} cannot run weight format {w.format!r}; "
                         f"convert the checkpoint to fp8-block or dense")

    def quantize_act(x, dtype, ue8m0):
        return act_quant(x, dtype, ue8m0, launch_pdl=target.pdl)

    # The fused MoE is built for FP8 experts. Unquantised ones (the cuda-bf16 profile) get the
    # reference's per-expert loop, chosen when the model is built (dsv3.plugins.manager.plan_ops),
    # with one warning then: correct, host-synchronising, not fast.
    @for_weight_formats(*FP8_FORMATS)
    def moe_experts(x, topk_weights, topk_ids, experts):
        return moe.moe_experts(target, x, topk_weights, topk_ids, experts, ue8m0=experts.gate.ue8m0_acts)

    return {
        # a row gather at copy bandwidth: torch's embedding kernel is already at the floor
        "embedding": F.embedding,
        "rms_norm": partial(norm.rms_norm, launch_pdl=target.pdl),
        "add_rms_norm": partial(norm.add_rms_norm, launch_pdl=target.pdl),
        "rope": partial(elementwise.rope, launch_pdl=target.pdl),
        "linear": linear,
        "silu_mul": partial(elementwise.silu_mul, launch_pdl=target.pdl),
        "quantize_act": quantize_act,
        "write_latent_cache": partial(elementwise.write_latent_cache, launch_pdl=target.pdl),
        "mla_prefill": lambda q, k, v, cu_q, cu_k, scale: mla.mla_prefill(target, q, k, v, cu_q, cu_k, scale),
        "mla_decode": lambda ql, qr, cache, bt, lens, scale: mla.mla_decode(target, ql, qr, cache, bt, lens, scale),
        "moe_gate": lambda x, weight, bias, spec: gate.moe_gate(x, weight, bias, spec, num_sms=target.num_sms,
                                                                  batch_invariant=target.batch_invariant,
                                                                  launch_pdl=target.pdl),
        "moe_experts": moe_experts,
        # DeepSeek Sparse Attention (V3.2): dsv3.backends.triton.dsa
        "write_index_cache": dsa.write_index_cache,
        "index_scores": dsa.index_scores,
        "index_topk": dsa.index_topk,
        "sparse_mla": lambda ql, qr, cache, slots, scale: dsa.sparse_mla(ql, qr, cache, slots, scale,
                                                                         num_sms=target.num_sms),
    }
