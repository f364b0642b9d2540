"""FP8 block-scaled GEMM: y [M, N] = (a * a_scale) @ (w * w_scale)^T, DeepSeek-V3's linear.

a: fp8 [M, K] with float32 scales [M, ceil(K/128)] (1x128 groups), or the raw activation (bf16 /
fp32) quantised inside the kernel with the same rule when QUANT_A (small M: saves a launch and the
fp8 round trip). w: fp8 [N, K] with float32 weight_scale_inv [ceil(N/128), ceil(K/128)].
BLOCK_K is 128 so one K step meets exactly one activation scale per row and one weight scale per
128 output columns; the partial dot of each K step is scaled in fp32 and accumulated.

Small M (decode) is bound by reading w once: the grid is split along K so every SM streams weight
bytes even when there are only a few output tiles. The splits of a tile write fp32 partials; the last
one to arrive (dsv3.backends.triton.counters) sums them in split order and writes the output, so a
split-K GEMM is one launch and its result does not depend on timing.

With programmatic dependent launch (PDL, dsv3.backends.triton.pdl) each program first asks L2 for
the weight lines of its first PREFETCH K steps (the weights are no kernel's output), then waits for
the kernel that produced `a`: the weight stream starts while that kernel drains.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl
from dsv3.backends.triton.counters import tile_counters
from dsv3.backends.triton.tuning import GemmConfig, gemm_prefetch_steps

BLOCK_K = 128


@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, count_ptr, M, N, K, k_steps_per_split,
                    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                    QUANT_A: tl.constexpr, UE8M0: tl.constexpr, FP8_MAX: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    # grouped order: GROUP_M row tiles share each column tile of w while it is in L2
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_cols = b_ptr + offs_n[None, :] * stride_bn
    bs_cols = bs_ptr + (offs_n // 128) * stride_bsn
    k_first = pid_k * k_steps_per_split
    k_last = tl.minimum(k_first + k_steps_per_split, tl.cdiv(K, BLOCK_K))
    if PDL:
        # one 128-byte line per output column and K step (BLOCK_K fp8 bytes); masked columns repeat the last
        lines = b_ptr + tl.minimum(offs_n, N - 1) * stride_bn                                   # [BN]
        for kb in range(k_first, tl.minimum(k_last, k_first + PREFETCH)):
            pdl.prefetch_l2(lines + kb * BLOCK_K)
    pdl.start(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k_first, k_last):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K
        b = tl.load(b_cols + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)   # [BK, BN]
        b_s = tl.load(bs_cols + kb, mask=mask_n, other=0.0)                                  # [BN]
        if QUANT_A:  # per-token 1x128 quantisation of the raw activation tile, as quantize_act does
            a_raw = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(a_raw), axis=1), 1e-12) / FP8_MAX
            if UE8M0:
                a_s = tl.exp2(tl.ceil(tl.log2(a_s)))
            a = tl.clamp(a_raw / a_s[:, None], -FP8_MAX, FP8_MAX).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mask_m, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    c = offs_m[:, None] * stride_cm + offs_n[None, :]
    if SPLIT:  # partial sums ws [splits, M, N]; the tile's last split adds them up in order
        splits = tl.num_programs(1)
        tl.store(ws_ptr + pid_k * M * N + c, acc, mask=mask_c)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if done == splits - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sp in range(0, splits):
                acc += tl.load(ws_ptr + sp * M * N + c, mask=mask_c, other=0.0, cache_modifier=".cg")
            tl.store(c_ptr + c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
            tl.store(count_ptr + pid, 0)
    else:
        tl.store(c_ptr + c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype, cfg: GemmConfig, ue8m0: bool = False, fp8_max: float = 448.0,
             launch_pdl: bool = False) -> torch.Tensor:
    """a [M, K] (fp8 with a_scale, or raw with a_scale None: quantised in-kernel), w [N, K] fp8 -> [M, N]."""
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    k_steps = triton.cdiv(k, BLOCK_K)
    split = max(1, min(cfg.split_k, k_steps))
    per_split = triton.cdiv(k_steps, split)
    split = triton.cdiv(k_steps, per_split)          # no empty splits
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if split > 1 else out
    quant_a = a_scale is None
    fp8_gemm_kernel[(tiles, split)](
        a, a if quant_a else a_scale, w, w_scale, out, ws, tile_counters(a.device, tiles if split > 1 else 1),
        m, n, k, per_split,
        a.stride(0), 0 if quant_a else a_scale.stride(0), w.stride(0), w_scale.stride(0), n,
        QUANT_A=quant_a, UE8M0=ue8m0, FP8_MAX=fp8_max,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m, SPLIT=split > 1,
        PREFETCH=gemm_prefetch_steps(n, k, per_split, cfg) if launch_pdl else 0, **pdl.launch_options(launch_pdl),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.extra)
    return out
