"""Fused MoE over FP8 block-scaled experts, with no host synchronisation (CUDA-graph safe).

  1. `moe_align_kernel` (one launch, one program per local expert): counts the routed rows of
     every expert (a histogram over the flat [T*k] expert ids), pads each expert's rows to a
     multiple of BLOCK_M and writes `sorted_ids` (flat row t*k+j, or the sentinel T*k for padding)
     and `block_expert` (the expert of each BLOCK_M rows, -1 past the end). Routes to experts this
     rank does not hold (expert parallelism) are dropped here. The grid of the GEMMs below is an
     upper bound known on the host: cdiv(T*k, BLOCK_M) + min(E, T*k) blocks; unused ones exit.
  2. `moe_gemm_kernel` GATED: per block of rows, the expert's gate and up projections share one
     pass over the gathered fp8 activations; the epilogue computes silu(gate) * up and quantises it
     again per 1x128 group (BLOCK_N = 128), so the intermediate goes out as fp8 + scales.
  3. `moe_gemm_kernel` not GATED: the down projection of those fp8 rows, multiplied by the row's
     routing weight, stored per routed row.
  4. `moe_sum_kernel`: out[t] = sum over the k routed rows of token t that this rank holds.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl
from dsv3.backends.triton.quant import act_quant
from dsv3.backends.triton.tuning import Target, moe_config
from dsv3.core.quant import FP8_MAX

TOKEN_CHUNK = 4096  # tokens per pass in prefill: bounds the [T*k, D] routed-row buffer


# N and max_blocks vary together with the token count (up to 9 divisibility variants, each compiled
# mid-serving on first use: 0.5-0.75 s on H100): left unspecialised, as is the MoE GEMM's row count
@triton.jit(do_not_specialize=["N", "max_blocks"])
def moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, N, first_expert, max_blocks,
                     E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl.start(PDL)
    e = tl.program_id(0)
    bins = tl.arange(0, BLOCK_E)                      # BLOCK_E > E: bin E collects routes held elsewhere
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, N, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        local = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32) - first_expert
        local = tl.where((local >= 0) & (local < E) & (offs < N), local, E)
        counts += tl.histogram(local, BLOCK_E)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded       # exclusive prefix: first padded row of each expert
    my_start = tl.sum(tl.where(bins == e, starts, 0), axis=0)
    my_count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(bins == e, padded, 0), axis=0)
    seen = 0
    for c0 in range(0, N, CHUNK):                     # stable: rows keep their flat order
        offs = c0 + tl.arange(0, CHUNK)
        local = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32) - first_expert
        mine = (local == e) & (offs < N)
        rank = seen + tl.cumsum(mine.to(tl.int32), axis=0) - 1
        tl.store(sorted_ptr + my_start + rank, offs.to(tl.int32), mask=mine)
        seen += tl.sum(mine.to(tl.int32), axis=0)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + my_start + my_count + pad, N, mask=my_count + pad < my_padded)
    first_block = my_start // BLOCK_M
    for b0 in range(0, my_padded // BLOCK_M, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        tl.store(block_expert_ptr + first_block + b, e, mask=b < my_padded // BLOCK_M)
    if e == E - 1:                                    # the last expert marks the unused tail
        used = tl.sum(padded, axis=0) // BLOCK_M
        for b0 in range(used, max_blocks, CHUNK):
            b = b0 + tl.arange(0, CHUNK)
            tl.store(block_expert_ptr + b, -1, mask=b < max_blocks)


@triton.jit(do_not_specialize=["num_rows"])
def moe_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, b2_ptr, b2s_ptr, out_ptr, outs_ptr, sorted_ptr, block_expert_ptr,
                    topk_w_ptr, N, K, num_rows, a_row_div,
                    stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn,
                    stride_om, stride_osm,
                    GATED: tl.constexpr, UE8M0: tl.constexpr, FP8_MAX: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)   # which expert a block of rows belongs to is the align kernel's output
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))   # flat routed rows (t*k + j)
    rmask = (rows >= 0) & (rows < tl.where(expert >= 0, num_rows, 0))      # padding and unused blocks: off
    rows = tl.where(rmask, rows, 0)            # unused blocks hold stale ids: keep even masked addresses sane
    e64 = tl.maximum(expert, 0).to(tl.int64)
    a_rows = rows // a_row_div                                              # GATED reads token rows of x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    a_base = a_ptr + a_rows[:, None].to(tl.int64) * stride_am
    b_base = b_ptr + e64 * stride_be + offs_n[None, :] * stride_bn
    bs_base = bs_ptr + e64 * stride_bse + (offs_n // 128) * stride_bsn
    b2_base = b2_ptr + e64 * stride_be + offs_n[None, :] * stride_bn
    b2s_base = b2s_ptr + e64 * stride_bse + (offs_n // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.where(expert >= 0, tl.cdiv(K, BLOCK_K), 0)               # unused blocks do nothing
    for kb in range(0, k_steps):
        k = kb * BLOCK_K + offs_k
        kmask = k < K
        a = tl.load(a_base + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a_s = tl.load(as_ptr + a_rows * stride_asm + kb, mask=rmask, other=0.0)
        b = tl.load(b_base + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        b_s = tl.load(bs_base + kb, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        if GATED:
            b2 = tl.load(b2_base + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            b2_s = tl.load(b2s_base + kb, mask=nmask, other=0.0)
            acc2 += tl.dot(a, b2) * a_s[:, None] * b2_s[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if GATED:  # h = silu(gate) * up, requantised per row over this 128-column group
        h = acc / (1.0 + tl.exp(-acc)) * acc2
        h_s = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-12) / FP8_MAX
        if UE8M0:
            h_s = tl.exp2(tl.ceil(tl.log2(h_s)))
        hq = tl.clamp(h / h_s[:, None], -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                 hq.to(out_ptr.dtype.element_ty), mask=omask)
        tl.store(outs_ptr + rows * stride_osm + pid_n, h_s, mask=rmask)
    else:      # down projection, times the routing weight of this row
        w = tl.load(topk_w_ptr + rows, mask=rmask, other=0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                 (acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def moe_sum_kernel(rows_ptr, ids_ptr, out_ptr, D, first_expert, num_local, stride_r, stride_o,
                   TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        local = tl.load(ids_ptr + t * TOP_K + j) - first_expert
        held = (local >= 0) & (local < num_local)
        acc += tl.load(rows_ptr + (t * TOP_K + j) * stride_r + offs, mask=offs < tl.where(held, D, 0),
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_experts(target: Target, x, topk_weights, topk_ids, experts, ue8m0: bool = False):
    out = torch.empty_like(x)
    for t0 in range(0, x.shape[0], TOKEN_CHUNK):
        t1 = min(t0 + TOKEN_CHUNK, x.shape[0])
        out[t0:t1] = _moe_chunk(target, x[t0:t1], topk_weights[t0:t1], topk_ids[t0:t1], experts, ue8m0)
    return out


def _moe_chunk(target: Target, x, topk_weights, topk_ids, experts, ue8m0):
    t, d = x.shape
    k = topk_ids.shape[1]
    gate, up, down = experts.gate, experts.up, experts.down
    num_e, inter = gate.data.shape[0], gate.data.shape[1]
    fp8 = gate.data.dtype
    fmax = FP8_MAX[fp8]
    n_rows = t * k
    cfg = moe_config(target, n_rows, num_e)
    bm = cfg.block_m
    max_blocks = triton.cdiv(n_rows, bm) + min(num_e, n_rows)
    ids = topk_ids.reshape(-1).contiguous()
    launch = pdl.launch_options(target.pdl)
    sorted_ids = torch.empty(max_blocks * bm, dtype=torch.int32, device=x.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=x.device)
    moe_align_kernel[(num_e,)](ids, sorted_ids, block_expert, n_rows, experts.first_expert, max_blocks,
                               E=num_e, BLOCK_M=bm, BLOCK_E=triton.next_power_of_2(num_e + 1),
                               CHUNK=min(1024, max(16, triton.next_power_of_2(n_rows))), **launch, num_warps=4)
    xq, xs = act_quant(x, fp8, ue8m0, launch_pdl=target.pdl)
    # gate + up -> fp8 h [T*k, I] and its scales [T*k, I/128]
    h = torch.empty((n_rows, inter), dtype=fp8, device=x.device)
    hs = torch.empty((n_rows, triton.cdiv(inter, 128)), dtype=torch.float32, device=x.device)
    assert cfg.block_n_up == 128, "the gated epilogue requantises one 128-column group per program"
    moe_gemm_kernel[(max_blocks, triton.cdiv(inter, cfg.block_n_up))](
        xq, xs, gate.data, gate.scale, up.data, up.scale, h, hs, sorted_ids, block_expert, topk_weights,
        inter, d, n_rows, k, xq.stride(0), xs.stride(0), gate.data.stride(0), gate.data.stride(1),
        gate.scale.stride(0), gate.scale.stride(1), h.stride(0), hs.stride(0),
        GATED=True, UE8M0=ue8m0, FP8_MAX=fmax, BLOCK_M=bm, BLOCK_N=cfg.block_n_up, BLOCK_K=128, **launch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.extra)
    # down, weighted -> routed rows [T*k, D] in x's dtype
    routed = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    moe_gemm_kernel[(max_blocks, triton.cdiv(d, cfg.block_n_down))](
        h, hs, down.data, down.scale, down.data, down.scale, routed, hs, sorted_ids, block_expert, weights,
        d, inter, n_rows, 1, h.stride(0), hs.stride(0), down.data.stride(0), down.data.stride(1),
        down.scale.stride(0), down.scale.stride(1), routed.stride(0), 0,
        GATED=False, UE8M0=ue8m0, FP8_MAX=fmax, BLOCK_M=bm, BLOCK_N=cfg.block_n_down, BLOCK_K=128, **launch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.extra)
    out = torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(d))
    moe_sum_kernel[(t, triton.cdiv(d, block))](routed, ids, out, d, experts.first_expert, num_e, routed.stride(0),
                                              out.stride(0), TOP_K=k, BLOCK=block, **launch, num_warps=4)
    return out
