"""Per-token-group FP8 activation quantisation: x [T, K] -> (fp8 [T, K], float32 scale [T, ceil(K/128)]).

scale = max(amax, 1e-12) / fp8_max per 1x128 group (rounded up to a power of two when ue8m0), the
definition in dsv3.core.quant.quantize_act_fp8. One program quantises GROUPS consecutive groups of
one row, so a row of 7168 channels (56 groups) is 7 programs of 8 groups: 16-byte loads, no reuse.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl
from dsv3.core.quant import FP8_MAX

GROUP = 128


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, stride_x, stride_q, stride_sr, stride_sg,
                     FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                     PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)                     # [GROUPS] group index
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]                 # [GROUPS, GROUP]
    mask = (col < K) & (g[:, None] < num_groups)
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / FP8_MAX           # [GROUPS]
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    q = tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + col, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sr + g * stride_sg, scale, mask=g < num_groups)


def act_quant(x: torch.Tensor, fp8_dtype: torch.dtype, ue8m0: bool = False, groups: int = 8,
              scale_column_major: bool = False, launch_pdl: bool = False):
    """scale_column_major: the scales as a [T, ng] view of [ng, T4] storage (T4 = T rounded up to
    4), the layout cuBLAS's 1x128 block-scaled GEMM reads."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, k = x.shape
    ng = triton.cdiv(k, GROUP)
    q = torch.empty((t, k), dtype=fp8_dtype, device=x.device)
    if scale_column_major:
        s = torch.empty((ng, -(-t // 4) * 4), dtype=torch.float32, device=x.device)[:, :t].t()
    else:
        s = torch.empty((t, ng), dtype=torch.float32, device=x.device)
    if t == 0:
        return q, s
    groups = min(groups, triton.next_power_of_2(ng))
    act_quant_kernel[(t, triton.cdiv(ng, groups))](
        x, q, s, k, ng, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
        FP8_MAX=FP8_MAX[fp8_dtype], UE8M0=ue8m0, GROUP=GROUP, GROUPS=groups, **pdl.launch_options(launch_pdl),
        num_warps=4)
    return q, s
