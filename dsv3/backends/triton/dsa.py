"""DeepSeek Sparse Attention (DeepSeek-V3.2) kernels: the ops of dsv3.core.ops.SparseOpSpecs.

The cache rows are [latent C | k_rope R | indexer key Di] (one row per token, paged like the latent cache).

- index_scores: one program per (token, run of BLOCK_N positions of its block table): the token's Hi
  index-head queries [Hi, Di] against BLOCK_N indexer keys gathered through the block table, one tensor-core
  product, ReLU, then the weighted sum over heads. Positions past the token's context get -inf. A decode
  token reads each of its keys once; prefill tokens of one sequence re-read the same keys (from L2).
- index_topk: a radix select, many programs per row: four 8-bit rounds (histogram the next digit of the keys
  matching the prefix so far, then pick the digit holding the k-th largest), then one pass writes the slots
  above the k-th key and as many ties as needed, through atomic counters (order within a row is free). Five
  reads of the scores, no sort, no host sync, nine launches.
- sparse_mla: one program per (token, BLOCK_H heads, run of slots): absorbed attention over the token's
  chosen slots, reading only those cache rows (latent and rope key), online softmax in fp32, -1 slots
  skipped; runs are merged by their log-sum-exp (a decode token alone would give H / BLOCK_H programs).
- write_index_cache: the indexer key into the last Di values of each token's row (slot -1: nothing).

Inputs may be bf16 or fp32 (the cache also fp8 e4m3, widened on load); products accumulate in fp32.
"""
import torch
import triton
import triton.language as tl

NEG_INF_UKEY = 8388607   # the order key of float32 -inf: bits 0xFF800000, magnitude bits flipped, plus 2^31


@triton.jit
def write_index_cache_kernel(cache_ptr, k_ptr, slot_ptr, stride_slot, stride_k, OFFSET,
                             D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < tl.where(slot >= 0, D, 0)
    k = tl.load(k_ptr + t * stride_k + d, mask=m)
    tl.store(cache_ptr + tl.maximum(slot, 0) * stride_slot + OFFSET + d, k.to(cache_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["stride_bt", "N"])
def index_scores_kernel(q_ptr, w_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, HI, N, KOFF,
                        stride_qt, stride_qh, stride_wt, stride_cb, stride_cs, stride_bt, stride_ot,
                        DI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    t, nb = tl.program_id(0), tl.program_id(1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=(h[:, None] < HI) & (d[None, :] < DI), other=0.0)                         # [BH, BD]
    w = tl.load(w_ptr + t * stride_wt + h, mask=h < HI, other=0.0).to(tl.float32)            # [BH]
    ctx = tl.load(lens_ptr + t)
    p = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    visible = p < ctx
    block = tl.load(bt_ptr + t * stride_bt + p // PAGE, mask=visible, other=0).to(tl.int64)
    row = block * stride_cb + (p % PAGE) * stride_cs
    k = tl.load(cache_ptr + row[:, None] + KOFF + d[None, :], mask=visible[:, None] & (d[None, :] < DI),
                other=0.0).to(q.dtype)                                                       # [BN, BD]
    s = tl.maximum(tl.dot(q, tl.trans(k)), 0.0)                                              # [BH, BN] relu
    score = tl.sum(w[:, None] * s, axis=0)                                                   # [BN]
    score = tl.where(visible, score, float("-inf"))
    tl.store(out_ptr + t * stride_ot + p, score, mask=p < N)


# Top-k as a radix select over the scores' order-preserving keys (ukey: float32 order as uint32, held in int64):
# four rounds of one 8-bit digit each, most significant first. A round's programs (many per row) histogram the
# digit of the keys that match the prefix chosen so far; one program per row then picks the digit where the
# k-th largest lies and how many keys equal to the prefix are still needed. A last pass writes the chosen slots.
@triton.jit(do_not_specialize=["N"])
def topk_hist_kernel(s_ptr, hist_ptr, state_ptr, N, stride_s, NEG_INF_UKEY: tl.constexpr, ROUND: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, p = tl.program_id(0), tl.program_id(1)
    prefix = tl.load(state_ptr + t * 3)
    acc = tl.zeros((512,), dtype=tl.int32)
    for n0 in range(p * CHUNK, p * CHUNK + CHUNK, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        bits = tl.load(s_ptr + t * stride_s + offs, mask=offs < N, other=float("-inf")).to(tl.int32, bitcast=True)
        ukey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
        match = (offs < N) & (ukey > NEG_INF_UKEY) & ((ukey >> (32 - 8 * ROUND)) == prefix)
        digit = ((ukey >> (24 - 8 * ROUND)) & 255).to(tl.int32)
        acc += tl.histogram(tl.where(match, digit, 300), 512)       # 300: outside the 256 digits, ignored
    tl.atomic_add(hist_ptr + t * 512 + tl.arange(0, 512), acc)


@triton.jit
def topk_choose_kernel(hist_ptr, state_ptr):
    t = tl.program_id(0)
    d = tl.arange(0, 256)
    h = tl.load(hist_ptr + t * 512 + d)
    prefix, need, short = tl.load(state_ptr + t * 3), tl.load(state_ptr + t * 3 + 1), tl.load(state_ptr + t * 3 + 2)
    at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h                 # keys with digit >= d
    digit = tl.max(tl.where(at_or_above >= need, d, -1), axis=0)              # where the need-th largest lies
    above = tl.sum(tl.where(d == digit, at_or_above - h, 0), axis=0)          # keys with a larger digit
    short = short | (digit < 0).to(tl.int64)   # fewer matching keys than needed (round 0: fewer finite than k)
    tl.store(state_ptr + t * 3, tl.where(short > 0, prefix, prefix * 256 + digit))
    tl.store(state_ptr + t * 3 + 1, tl.where(short > 0, need, need - above))
    tl.store(state_ptr + t * 3 + 2, short)
    tl.store(hist_ptr + t * 512 + tl.arange(0, 512), tl.zeros((512,), dtype=tl.int32))   # blank for the next round


@triton.jit(do_not_specialize=["stride_bt", "N"])
def topk_gather_kernel(s_ptr, bt_ptr, out_ptr, state_ptr, count_ptr, N, K, stride_s, stride_bt, stride_o,
                       NEG_INF_UKEY: tl.constexpr, PAGE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, p = tl.program_id(0), tl.program_id(1)
    short = tl.load(state_ptr + t * 3 + 2) > 0
    tau = tl.where(short, NEG_INF_UKEY, tl.load(state_ptr + t * 3))     # the k-th largest key (short: every finite)
    ties = tl.where(short, 0, tl.load(state_ptr + t * 3 + 1)).to(tl.int32)   # keys equal to tau still to take
    for n0 in range(p * CHUNK, p * CHUNK + CHUNK, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        bits = tl.load(s_ptr + t * stride_s + offs, mask=offs < N, other=float("-inf")).to(tl.int32, bitcast=True)
        ukey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
        valid = (offs < N) & (ukey > NEG_INF_UKEY)
        gt, eq = (valid & (ukey > tau)).to(tl.int32), (valid & (ukey == tau) & ~short).to(tl.int32)
        base_gt = tl.atomic_add(count_ptr + t * 2, tl.sum(gt, axis=0))
        base_eq = tl.atomic_add(count_ptr + t * 2 + 1, tl.sum(eq, axis=0))
        rank = base_eq + tl.cumsum(eq, axis=0) - 1
        col = tl.where(gt > 0, base_gt + tl.cumsum(gt, axis=0) - 1, K - ties + rank)
        chosen = (gt > 0) | ((eq > 0) & (rank < ties))
        block = tl.load(bt_ptr + t * stride_bt + offs // PAGE, mask=chosen, other=0).to(tl.int64)
        tl.store(out_ptr + t * stride_o + col, block * PAGE + offs % PAGE, mask=chosen & (col < K))


@triton.jit(do_not_specialize=["per_split"])
def sparse_mla_kernel(ql_ptr, qr_ptr, cache_ptr, slots_ptr, o_ptr, lse_ptr, H, K, scale, per_split,
                      stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cs, stride_st, stride_ot, stride_oh,
                      stride_os, stride_lt, stride_lh,
                      C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
    """One (token, BLOCK_H heads, run of per_split slots): DIRECT writes the normalised output; otherwise
    an fp32 partial output and its log-sum-exp per split, merged by sparse_mla_combine_kernel."""
    t, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = heads < H
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    ql = tl.load(ql_ptr + t * stride_qlt + heads[:, None] * stride_qlh + c[None, :],
                 mask=hm[:, None] & (c[None, :] < C), other=0.0)                              # [BH, BC]
    qr = tl.load(qr_ptr + t * stride_qrt + heads[:, None] * stride_qrh + r[None, :],
                 mask=hm[:, None] & (r[None, :] < R), other=0.0)                              # [BH, BR]
    m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    end = tl.minimum(sp * per_split + per_split, K)
    for n0 in range(sp * per_split, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(slots_ptr + t * stride_st + j, mask=j < end, other=-1)
        valid = slot >= 0
        base = tl.maximum(slot, 0).to(tl.int64) * stride_cs
        lat = tl.load(cache_ptr + base[:, None] + c[None, :], mask=valid[:, None] & (c[None, :] < C),
                      other=0.0).to(ql.dtype)                                                 # [BN, BC]
        rp = tl.load(cache_ptr + base[:, None] + C + r[None, :], mask=valid[:, None] & (r[None, :] < R),
                     other=0.0).to(qr.dtype)                                                  # [BN, BR]
        s = (tl.dot(ql, tl.trans(lat)) + tl.dot(qr, tl.trans(rp))) * scale                    # [BH, BN]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    omask = hm[:, None] & (c[None, :] < C)
    if DIRECT:
        tl.store(o_ptr + t * stride_ot + heads[:, None] * stride_oh + c[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=omask)
    else:   # a split with no valid slot has l = 0: log-sum-exp -inf, weight 0 in the merge
        tl.store(o_ptr + t * stride_ot + heads[:, None] * stride_oh + sp * stride_os + c[None, :], out, mask=omask)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + t * stride_lt + heads * stride_lh + sp, lse, mask=hm)


@triton.jit
def sparse_mla_combine_kernel(part_ptr, lse_ptr, out_ptr, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                              stride_ot, stride_oh, S, C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + sp, mask=sp < S, other=float("-inf"))   # [BS]
    top = tl.max(lse, axis=0)
    total = tl.sum(tl.exp(lse - top), axis=0)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(S):   # one split's partial output at a time: [BLOCK_C] in registers, not [S, BLOCK_C]
        w = tl.exp(tl.load(lse_ptr + t * stride_lt + h * stride_lh + i) - top) / total
        acc += w * tl.load(part_ptr + t * stride_pt + h * stride_ph + i * stride_ps + c, mask=c < C, other=0.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + c, acc.to(out_ptr.dtype.element_ty), mask=c < C)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def write_index_cache(cache, index_k, slots):
    t, di = index_k.shape
    if index_k.stride(-1) != 1:
        index_k = index_k.contiguous()
    if t:
        write_index_cache_kernel[(t,)](cache, index_k, slots, cache.stride(1), index_k.stride(0),
                                       cache.shape[-1] - di, D=di, BLOCK_D=triton.next_power_of_2(di), num_warps=1)


def index_scores(q, weights, cache, block_table, context_lens, block_n: int = 64):
    t, hi, di = q.shape
    page = cache.shape[1]
    n = block_table.shape[1] * page
    if q.stride(-1) != 1:
        q = q.contiguous()
    weights = weights.float().contiguous()
    out = torch.empty((t, n), dtype=torch.float32, device=q.device)
    if t and n:
        index_scores_kernel[(t, triton.cdiv(n, block_n))](
            q, weights, cache, block_table, context_lens, out, hi, n, cache.shape[-1] - di,
            q.stride(0), q.stride(1), weights.stride(0), cache.stride(0), cache.stride(1), block_table.stride(0),
            out.stride(0), DI=di, BLOCK_H=_pow2(hi), BLOCK_D=_pow2(di), PAGE=page, BLOCK_N=block_n, num_warps=4)
    return out


def index_topk(scores, block_table, k, chunk: int = 4096, block: int = 1024):
    t, n = scores.shape
    k = min(k, n)
    out = torch.full((t, k), -1, dtype=torch.int64, device=scores.device)
    if not (t and k):
        return out
    scores = scores.contiguous()
    block = min(block, triton.next_power_of_2(n))
    chunk = max(block, min(chunk, triton.next_power_of_2(n)))
    programs = (t, triton.cdiv(n, chunk))
    state = torch.zeros((t, 3), dtype=torch.int64, device=scores.device)    # prefix, keys still needed, short
    state[:, 1] = k
    hist = torch.zeros((t, 512), dtype=torch.int32, device=scores.device)
    for r in range(4):
        topk_hist_kernel[programs](scores, hist, state, n, scores.stride(0), NEG_INF_UKEY=NEG_INF_UKEY, ROUND=r,
                                   CHUNK=chunk, BLOCK=block, num_warps=4)
        topk_choose_kernel[(t,)](hist, state, num_warps=4)
    counts = torch.zeros((t, 2), dtype=torch.int32, device=scores.device)
    topk_gather_kernel[programs](scores, block_table, out, state, counts, n, k, scores.stride(0), block_table.stride(0),
                                 out.stride(0), NEG_INF_UKEY=NEG_INF_UKEY, PAGE=n // block_table.shape[1], CHUNK=chunk,
                                 BLOCK=block, num_warps=4)
    return out


def sparse_mla(q_latent, q_rope, cache, slots, scale, block_h: int = 16, block_n: int = 32,
               splits: int | None = None, num_sms: int = 132):
    """splits: runs of slots per (token, head block), merged after (None: enough programs to fill
    2 x num_sms, as a decode batch of one token has only H / block_h of them otherwise)."""
    t, h, c = q_latent.shape
    r = q_rope.shape[-1]
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    slots = slots.contiguous()
    out = torch.empty_like(q_latent)
    k = slots.shape[1]
    if not t:
        return out
    head_blocks, runs = triton.cdiv(h, block_h), triton.cdiv(k, block_n)
    if splits is None:
        splits = triton.cdiv(2 * num_sms, t * head_blocks)
    per_split = triton.cdiv(triton.cdiv(k, max(1, min(splits, runs))), block_n) * block_n
    splits = triton.cdiv(k, per_split)
    direct = splits == 1
    part = out if direct else torch.empty((t, h, splits, c), dtype=torch.float32, device=out.device)
    lse = out if direct else torch.empty((t, h, splits), dtype=torch.float32, device=out.device)
    sparse_mla_kernel[(t, head_blocks, splits)](
        q_latent, q_rope, cache, slots, part, lse, h, k, scale, per_split,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(1), slots.stride(0),
        part.stride(0), part.stride(1), 0 if direct else part.stride(2), 0 if direct else lse.stride(0),
        0 if direct else lse.stride(1), C=c, R=r, BLOCK_C=_pow2(c), BLOCK_R=_pow2(r), BLOCK_H=block_h,
        BLOCK_N=block_n, DIRECT=direct, num_warps=4)
    if not direct:
        sparse_mla_combine_kernel[(t, h)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                                          lse.stride(1), out.stride(0), out.stride(1), splits, C=c,
                                          BLOCK_S=triton.next_power_of_2(splits), BLOCK_C=_pow2(c), num_warps=4)
    return out
