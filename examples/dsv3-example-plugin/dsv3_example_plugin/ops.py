"""The example backend's ops. Signatures and meaning: dsv3.core.ops.OpSpecs.

`CALLS` counts calls per op, so a test (or you) can see which implementation ran.
"""
from collections import Counter

import torch
import torch.nn.functional as F

from dsv3.core.weights import QuantWeight

CALLS: Counter = Counter()


def rms_norm(x, weight, eps):
    CALLS["rms_norm"] += 1
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def add_rms_norm(x, residual, weight, eps):
    CALLS["add_rms_norm"] += 1
    h = x + residual
    return rms_norm(h, weight, eps), h


def silu_mul(gate, up):
    CALLS["silu_mul"] += 1
    return gate * torch.sigmoid(gate) * up


def linear(x, w: QuantWeight):
    """int8-w8a8: quantise x per token to int8, multiply integers, rescale (what an int8 matrix unit
    does); dense: a plain matmul. (`w.act_scale_fmt`, V3.1's power-of-two scales, concerns FP8
    activations only: int8 keeps its per-token float scale.)"""
    CALLS["linear"] += 1
    if w.format == "dense":
        return F.linear(x, w.data.to(x.dtype))
    if w.format != "int8-w8a8":
        raise ValueError(f"example backend runs dense and int8-w8a8 weights, not {w.format}")
    x_scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127      # [T, 1]
    x_int = torch.round(x.float() / x_scale).clamp(-127, 127)                        # [T, K] integers
    acc = F.linear(x_int, w.data.float())          # integer products summed in fp32 (int32 on real hardware)
    return (acc * x_scale * w.scale.float()).to(x.dtype)
