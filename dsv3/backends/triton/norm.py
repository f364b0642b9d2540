"""RMSNorm, optionally fused with the residual add: one pass over [T, D] instead of three.

out = (h * rsqrt(mean(h^2) + eps) * w) in x's dtype with h = x (+ residual), computed in float32.
The sum h is rounded to x's dtype first (and stored: it is the next residual), exactly as the
reference's bf16 `x + residual` does, so the norm sees the same h. One program per row: a
DeepSeek-V3 row (7168) fits one block.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, stride_x, stride_r, stride_y, stride_h, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(y_ptr + row * stride_y + offs, (x * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, launch_pdl):
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, d = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else y
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    block = triton.next_power_of_2(d)
    if t:
        rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, y, h, d, x.stride(0),
                              residual.stride(0) if residual is not None else 0, y.stride(0), h.stride(0), eps,
                              HAS_RESIDUAL=residual is not None, BLOCK_D=block, **pdl.launch_options(launch_pdl),
                              num_warps=min(16, max(1, block // 512)))
    return y, h


def rms_norm(x, weight, eps, launch_pdl=False):
    return _launch(x, None, weight, eps, launch_pdl)[0]


def add_rms_norm(x, residual, weight, eps, launch_pdl=False):
    return _launch(x, residual, weight, eps, launch_pdl)
