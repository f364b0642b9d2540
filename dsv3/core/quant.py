"""Quantisation math in plain torch: the definitions every backend and `convert` are checked against.

DeepSeek-V3 FP8: weights float8_e4m3fn with one float32 scale per 128x128 block (`weight_scale_inv`,
dequantised = fp8 * scale); activations quantised on the fly per token per 128 channels (1x128),
scale = amax / fp8_max. V3.1 (`scale_fmt: ue8m0`) rounds every scale up to a power of two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.core.weights import BLOCK, QuantWeight, expand_block_scale

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
_TINY = 1e-12  # amax floor: an all-zero block gets a finite scale, not a division by zero


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to the next power of two (UE8M0: 8 exponent bits, no mantissa)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantize_fp8_block(w: torch.Tensor, ue8m0: bool = False,
                       dtype: torch.dtype = torch.float8_e4m3fn) -> QuantWeight:
    """[out, in] real weight -> FP8 data + [ceil(out/128), ceil(in/128)] float32 scale_inv."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // BLOCK), -(-in_f // BLOCK)
    padded = F.pad(w.float(), (0, nb_i * BLOCK - in_f, 0, nb_o * BLOCK - out_f))
    blocks = padded.view(nb_o, BLOCK, nb_i, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(_TINY)          # [nb_o, nb_i]
    scale = amax / FP8_MAX[dtype]
    if ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (w.float() / expand_block_scale(scale, out_f, in_f)).clamp(-FP8_MAX[dtype], FP8_MAX[dtype])
    return QuantWeight(q.to(dtype), scale.float(), "fp8-fnuz" if dtype == torch.float8_e4m3fnuz else "fp8-block")


def fp8_fn_to_fnuz(w: QuantWeight) -> QuantWeight:
    """e4m3fn -> e4m3fnuz, exactly: the same bits mean half the value in fnuz (exponent bias 8, not 7),
    so keep the bits and double the scale. The fn pattern 0x80 (-0) is NaN in fnuz and becomes 0;
    fn NaN (0x7F, 0xFF) becomes fnuz NaN (0x80)."""
    bits = w.data.view(torch.uint8).clone()
    nan = (bits & 0x7F) == 0x7F
    bits[bits == 0x80] = 0x00
    bits[nan] = 0x80
    return QuantWeight(bits.view(torch.float8_e4m3fnuz), w.scale * 2.0, "fp8-fnuz")


def quantize_int8_channel(w: torch.Tensor) -> QuantWeight:
    """[out, in] real weight -> int8 data with one float32 scale per output channel (symmetric)."""
    scale = (w.float().abs().amax(dim=-1) / 127.0).clamp_min(_TINY)
    q = torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127)
    return QuantWeight(q.to(torch.int8), scale, "int8-w8a8")


def quantize_act_fp8(x: torch.Tensor, group: int = BLOCK, ue8m0: bool = False,
                     dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group activation quantisation: x [T, K] -> (fp8 [T, K], float32 scale [T, ceil(K/group)])."""
    t, k = x.shape
    ng = -(-k // group)
    xp = F.pad(x.float(), (0, ng * group - k)).view(t, ng, group)
    scale = xp.abs().amax(dim=-1).clamp_min(_TINY) / FP8_MAX[dtype]   # [T, ng]
    if ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (xp / scale.unsqueeze(-1)).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).view(t, ng * group)[:, :k]
    return q.to(dtype), scale


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [T, K] -> (int8 [T, K], float32 scale [T])."""
    scale = (x.float().abs().amax(dim=-1) / 127.0).clamp_min(_TINY)
    return torch.round(x.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale
