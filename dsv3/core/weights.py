"""Weights that carry their format into `linear`.

The model never multiplies a quantised weight itself: it hands a `QuantWeight` to the backend's
`linear` / `moe_experts`, and the backend knows how to use (data, scale, format).

Formats (the names profiles and `dsv3-run convert` use):
  dense      data in the activation dtype (bf16 / fp16 / fp32), no scale
  fp8-block  float8_e4m3fn data, float32 `scale` = weight_scale_inv of shape
             [ceil(out/128), ceil(in/128)]; dequantised = data * scale per 128x128 block
  fp8-fnuz   as fp8-block with float8_e4m3fnuz data (AMD MI300); same scale layout
  int8-w8a8  int8 data, float32 per-output-channel scale [out] (Ascend); dequantised = data * scale[:, None]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_FORMATS = ("dense", "fp8-block", "fp8-fnuz", "int8-w8a8")
BLOCK = 128  # DeepSeek-V3's weight_block_size, both dimensions

STORAGE_DTYPE = {
    "fp8-block": torch.float8_e4m3fn,
    "fp8-fnuz": torch.float8_e4m3fnuz,
    "int8-w8a8": torch.int8,
}


ACT_SCALE_FORMATS = (None, "ue8m0")


@dataclass(frozen=True)
class QuantWeight:
    """`act_scale_fmt` is part of an FP8 weight's numerics: how the 1x128 activation scales of x in
    `linear(x, w)` / `moe_experts` are rounded. None: amax / fp8_max as computed (V3, R1); backends
    may quantise x that way or not at all, and the reference multiplies exactly. "ue8m0" (V3.1,
    `quantization_config.scale_fmt`): rounded up to a power of two; every backend that quantises x
    must do so, and the reference then emulates the quantisation (x through quantize_act_fp8 with
    ue8m0, then the exact product), so a backend is checked against the checkpoint's own numerics.
    Ignored for dense and int8 weights (int8 activations have per-token float scales)."""
    data: torch.Tensor            # [..., out, in]; leading dims stack experts
    scale: torch.Tensor | None    # see module docstring; None for dense
    format: str
    act_scale_fmt: str | None = None

    @property
    def ue8m0_acts(self) -> bool:
        """True when FP8 activations for this weight take power-of-two scales."""
        return self.act_scale_fmt == "ue8m0" and self.format in ("fp8-block", "fp8-fnuz")

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    @property
    def in_features(self) -> int:
        return self.data.shape[-1]


def scale_shape(fmt: str, out_features: int, in_features: int) -> tuple[int, ...] | None:
    if fmt in ("fp8-block", "fp8-fnuz"):
        return (-(-out_features // BLOCK), -(-in_features // BLOCK))
    if fmt == "int8-w8a8":
        return (out_features,)
    return None


def expand_block_scale(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """[..., ceil(o/128), ceil(i/128)] -> [..., o, i]: each block's scale over its (possibly partial) block."""
    s = scale.repeat_interleave(BLOCK, dim=-2)[..., :out_features, :]
    return s.repeat_interleave(BLOCK, dim=-1)[..., :in_features]


def _dequantize_blocks(data: torch.Tensor, scale: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """data [..., o, i] * per-block scale [..., ceil(o/128), ceil(i/128)], through a block-shaped view of
    the (padded) data: one pass, no full-size copy of the scales."""
    *lead, o, i = data.shape
    nb_o, nb_i = scale.shape[-2:]
    x = data.to(acc)
    if (o, i) != (nb_o * BLOCK, nb_i * BLOCK):
        x = torch.nn.functional.pad(x, (0, nb_i * BLOCK - i, 0, nb_o * BLOCK - o))
    x = x.view(*lead, nb_o, BLOCK, nb_i, BLOCK) * scale.to(acc)[..., :, None, :, None]
    return x.view(*lead, nb_o * BLOCK, nb_i * BLOCK)[..., :o, :i]


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real-valued weight a QuantWeight stands for, in `dtype` (math in float32, or float64 if asked)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if w.format == "dense":
        return w.data.to(dtype)
    if w.format in ("fp8-block", "fp8-fnuz"):
        return _dequantize_blocks(w.data, w.scale, acc).to(dtype)
    if w.format == "int8-w8a8":
        return (w.data.to(acc) * w.scale.to(acc).unsqueeze(-1)).to(dtype)
    raise ValueError(f"unknown weight format {w.format!r}; known: {', '.join(WEIGHT_FORMATS)}")
