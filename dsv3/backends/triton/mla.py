"""MLA attention kernels.

Decode (absorbed), FlashMLA's structure in Triton: each query head attends in latent space over the
paged cache [num_blocks, block_size, C + R]. One program owns BLOCK_H heads (64 of V3's 128 on
Hopper: the two programs of a token are adjacent in the grid, so the second reads the rows from L2)
and one split of the context. Each cache tile [BLOCK_N, 576] is loaded once into shared memory and
feeds both tensor-core products: scores = tile @ q^T and out^T += tile^T @ p (all transposed, see
the kernel). Splits write fp32 partial outputs with their log-sum-exp, `mla_decode_combine_kernel`
merges them. The cache may be bf16 or fp8 (e4m3, unscaled, as the reference casts it); tiles are
widened to the query's dtype before the products. Softmax runs in base 2 (scale times log2 e).

Prefill (naive, expanded): flash attention over ragged sequences, qk head dim = nope + rope
(128 + 64: two dots, no padding to 256), v head dim 128, causal with queries aligned to the end
of their keys.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl
from dsv3.backends.triton.tuning import Target, mla_decode_config, mla_decode_splits, mla_prefill_config

LOG2E = 1.4426950408889634


# the block table's width and the split count change from step to step in eager (mixed) steps: left
# unspecialised, so they do not each compile a new variant mid-serving (1.1-1.5 s per compile on H100)
@triton.jit(do_not_specialize=["stride_bt", "splits"])
def mla_decode_kernel(ql_ptr, qr_ptr, cache_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, H, scale,
                      stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cb, stride_cs, stride_bt,
                      stride_ot, stride_oh, stride_os, stride_lt, stride_lh, splits,
                      C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                      PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      DIRECT: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    # Everything is computed transposed (keys / latent channels as rows, heads as columns) so that
    # the cache tile is the A operand of both products and q is the B operand kept in shared
    # memory: with heads as rows, q [BLOCK_H, 512] would sit in registers beside the
    # [BLOCK_H, 512] fp32 accumulator and spill (ptxas: 255 registers + 1 KB stack at BLOCK_H 64).
    pdl.start(PDL)
    hb, t, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    hmask = heads < H
    ql_t = tl.load(ql_ptr + t * stride_qlt + heads[None, :] * stride_qlh + c[:, None],
                   mask=hmask[None, :] & (c[:, None] < C), other=0.0)                         # [BC, BH]
    qr_t = tl.load(qr_ptr + t * stride_qrt + heads[None, :] * stride_qrh + r[:, None],
                   mask=hmask[None, :] & (r[:, None] < R), other=0.0)                         # [BR, BH]
    ctx = tl.load(lens_ptr + t)
    # each token's context is cut into `splits` equal runs (read on the device: no host sync, and a
    # short context leaves trailing splits empty instead of idling on a long block table)
    per_split = tl.cdiv(tl.cdiv(ctx, splits), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, ctx)
    m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)  # finite: fully masked columns give 0, not NaN
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)                                      # out^T
    j = tl.arange(0, BLOCK_N)
    tile = j[:, None] * stride_cs + c[None, :]                # [BN, BC] offsets of a tile inside one page
    # tl.range with an explicit depth: a plain range() here is not software-pipelined (no cp.async
    # in the TTGIR with Triton 3.9), so each tile's load would stall the tensor cores
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        n = n0 + j
        nmask = n < end
        if PAGE % BLOCK_N == 0:
            # the tile lies in one page: one block-table read, a scalar base and loop-invariant int32
            # offsets (a [BN, BC] tensor of 64-bit row pointers costs ~128 registers per thread and spilled)
            page = tl.load(bt_ptr + t * stride_bt + n0 // PAGE).to(tl.int64)
            base = cache_ptr + page * stride_cb + (n0 % PAGE) * stride_cs
            kv = tl.load(base + tile, mask=nmask[:, None] & (c[None, :] < C), other=0.0)
            kr = tl.load(base + j[:, None] * stride_cs + C + r[None, :], mask=nmask[:, None] & (r[None, :] < R),
                         other=0.0)
        else:  # pages smaller than a tile (tiny block sizes): per-row gather
            page = tl.load(bt_ptr + t * stride_bt + n // PAGE, mask=nmask, other=0).to(tl.int64)
            row = cache_ptr + page * stride_cb + (n % PAGE) * stride_cs                      # [BN]
            kv = tl.load(row[:, None] + c[None, :], mask=nmask[:, None] & (c[None, :] < C), other=0.0)
            kr = tl.load(row[:, None] + C + r[None, :], mask=nmask[:, None] & (r[None, :] < R), other=0.0)
        # the latent tile is read once and feeds both products (K = [latent | rope], V = latent);
        # an fp8 cache is widened to the query's dtype here, as the reference casts it
        kv = kv.to(ql_t.dtype)                                                               # [BN, BC]
        kr = kr.to(qr_t.dtype)                                                               # [BN, BR]
        score = tl.dot(kv, ql_t) + tl.dot(kr, qr_t)                                           # [BN, BH]
        score = tl.where(nmask[:, None], score * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new[None, :])                                                  # [BN, BH]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kv), p.to(kv.dtype))                     # [BC, BH]
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[None, :]
    omask = hmask[None, :] & (c[:, None] < C)
    if DIRECT:
        tl.store(o_ptr + t * stride_ot + heads[None, :] * stride_oh + c[:, None], out.to(o_ptr.dtype.element_ty),
                 mask=omask)
    else:
        tl.store(o_ptr + t * stride_ot + heads[None, :] * stride_oh + s * stride_os + c[:, None], out,
                 mask=omask & has[None, :])                 # empty splits write only their lse
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + t * stride_lt + heads * stride_lh + s, lse, mask=hmask)


@triton.jit
def mla_decode_combine_kernel(o_part_ptr, lse_ptr, out_ptr, H, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                              stride_ot, stride_oh, S, C: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    t, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + s, mask=s < S, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))                                                   # [BS]
    live = (s < S) & (lse > float("-inf"))                                                  # empty splits wrote no rows
    part = tl.load(o_part_ptr + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + c[None, :],
                   mask=live[:, None] & (c[None, :] < C), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + c, out.to(out_ptr.dtype.element_ty), mask=c < C)


def mla_decode(target: Target, q_latent, q_rope, cache, block_table, context_lens, scale, cfg=None, splits=None):
    """cfg / splits override the tuning table (benchmarks/mla_decode_sweep.py times candidates)."""
    t, nh, c = q_latent.shape
    r = q_rope.shape[-1]
    out = torch.empty((t, nh, c), dtype=q_latent.dtype, device=q_latent.device)
    if t == 0:
        return out
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    cfg = cfg or mla_decode_config(target, nh, cache.dtype)
    page = cache.shape[1]
    head_blocks = triton.cdiv(nh, cfg.block_h)
    # how many splits: from the grid size and the block table width (a host-known bound on context)
    max_ctx = block_table.shape[1] * page
    splits = splits or mla_decode_splits(target, t, head_blocks, max_ctx, cfg.block_n)
    direct = splits == 1
    if direct:
        o, lse = out, out
        so = (out.stride(0), out.stride(1), 0)
        sl = (0, 0)
    else:
        o = torch.empty((t, nh, splits, c), dtype=torch.float32, device=q_latent.device)
        lse = torch.empty((t, nh, splits), dtype=torch.float32, device=q_latent.device)
        so = (o.stride(0), o.stride(1), o.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    mla_decode_kernel[(head_blocks, t, splits)](
        q_latent, q_rope, cache, block_table, context_lens, o, lse, nh, scale * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(0), cache.stride(1),
        block_table.stride(0), *so, *sl, splits,
        C=c, R=r, BLOCK_C=triton.next_power_of_2(c), BLOCK_R=max(16, triton.next_power_of_2(r)), PAGE=page,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, DIRECT=direct, STAGES=cfg.num_stages,
        **pdl.launch_options(target.pdl), num_warps=cfg.num_warps, **cfg.extra)
    if not direct:
        mla_decode_combine_kernel[(t, nh)](
            o, lse, out, nh, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), splits, C=c, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            BLOCK_C=triton.next_power_of_2(c), **pdl.launch_options(target.pdl), num_warps=4)
    return out


@triton.jit
def mla_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, scale,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                       DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_DN: tl.constexpr,
                       BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(cu_q_ptr + b)
    lq = tl.load(cu_q_ptr + b + 1) - q0
    k0 = tl.load(cu_k_ptr + b)
    lk = tl.load(cu_k_ptr + b + 1) - k0
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)                    # query index within the sequence
    imask = i < lq
    last_key = lk - lq + i                                      # query i sees keys 0..last_key
    dn, dr, dv = tl.arange(0, BLOCK_DN), tl.arange(0, BLOCK_DR), tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + (q0 + i)[:, None].to(tl.int64) * stride_qt + h * stride_qh
    qn = tl.load(q_rows + dn[None, :], mask=imask[:, None] & (dn[None, :] < DN), other=0.0)
    qr = tl.load(q_rows + DN + dr[None, :], mask=imask[:, None] & (dr[None, :] < DR), other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    hi = tl.where(mb * BLOCK_M < lq, tl.minimum(lk, lk - lq + (mb + 1) * BLOCK_M), 0)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < lk
        k_rows = k_ptr + (k0 + n)[:, None].to(tl.int64) * stride_kt + h * stride_kh
        kn = tl.load(k_rows + dn[None, :], mask=nmask[:, None] & (dn[None, :] < DN), other=0.0)
        kr = tl.load(k_rows + DN + dr[None, :], mask=nmask[:, None] & (dr[None, :] < DR), other=0.0)
        v = tl.load(v_ptr + (k0 + n)[:, None].to(tl.int64) * stride_vt + h * stride_vh + dv[None, :],
                    mask=nmask[:, None] & (dv[None, :] < DV), other=0.0)
        score = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))
        visible = (n[None, :] <= last_key[:, None]) & nmask[None, :]
        score = tl.where(visible, score * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q0 + i)[:, None].to(tl.int64) * stride_ot + h * stride_oh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=imask[:, None] & (dv[None, :] < DV))


def mla_prefill(target: Target, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
    tq, nh, dqk = q.shape
    dv = v.shape[-1]
    out = torch.empty((tq, nh, dv), dtype=q.dtype, device=q.device)
    if tq == 0:
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # q.k over 192 dims = two dots, over the largest power of two (128: nope) and the rest (64: rope);
    # any split gives the same sum, this one wastes no lanes on V3's shapes
    dn = 1 << (dqk.bit_length() - 1)
    dr = dqk - dn
    cfg = mla_prefill_config(target)
    lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    max_q = int(lens.max())   # one host sync per prefill call: the grid's height (prefill is never graph-captured)
    grid = (triton.cdiv(max_q, cfg.block_h), nh, lens.shape[0])
    mla_prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DN=dn, DR=dr, DV=dv, BLOCK_DN=max(16, triton.next_power_of_2(dn)), BLOCK_DR=max(16, triton.next_power_of_2(dr)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=cfg.block_h, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.extra)
    return out
