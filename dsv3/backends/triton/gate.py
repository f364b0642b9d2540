"""noaux_tc MoE routing in one kernel: logits, sigmoid, biased group-limited top-k, weights.

x [T, D] @ W^T [D, E] with fp32 accumulation (bf16 products are exact in fp32, as in the
reference's float32 matmul), s = sigmoid; choose with s + bias: group score = sum of the top-2
biased scores of each group, keep `topk_group` groups, take the top-k experts of those; weights are
the unbiased s of the chosen experts, normalised and scaled.

Two launches: `gate_logits_kernel` spreads the logits over (token tiles x expert tiles x D splits)
so a decode step streams the 3.7 MB gate matrix with the whole GPU (one program per token tile read
it at one SM's bandwidth: 50 us), writing fp32 partial logits; `moe_gate_kernel` sums the partials
and does the routing for BLOCK_T tokens per program.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def gate_logits_kernel(x_ptr, w_ptr, part_ptr, T, D, E, d_per_split, stride_x, stride_w,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[s, t, e] = sum over split s's slice of D of x[t, d] * w[e, d], fp32."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    s = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    tmask, emask = tok < T, e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    d_end = tl.minimum(s * d_per_split + d_per_split, D)
    for d0 in range(s * d_per_split, d_end, BLOCK_D):
        dm = d0 + d < d_end
        xs = tl.load(x_ptr + tok[:, None] * stride_x + d0 + d[None, :], mask=tmask[:, None] & dm[None, :], other=0.0)
        ws = tl.load(w_ptr + e[:, None] * stride_w + d0 + d[None, :], mask=emask[:, None] & dm[None, :], other=0.0)
        acc += tl.dot(xs, tl.trans(ws))
    tl.store(part_ptr + (s * T + tok[:, None]) * E + e[None, :], acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def moe_gate_kernel(part_ptr, bias_ptr, wout_ptr, iout_ptr, T, SPLITS, routed_scale,
                    E: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    tmask, emask = tok < T, e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + (s * T + tok[:, None]) * E + e[None, :], mask=tmask[:, None] & emask[None, :],
                       other=0.0)
    scores = tl.sigmoid(acc)                                                    # [BT, BE]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=emask, other=0.0)[None, :]
    choice = tl.where(emask[None, :], choice, float("-inf"))
    gid = e // (E // N_GROUP)
    g = tl.arange(0, BLOCK_G)
    gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), dtype=tl.float32)
    for gi in tl.static_range(N_GROUP):                       # group score = sum of its top-2
        v = tl.where((gid == gi)[None, :], choice, float("-inf"))
        best = tl.argmax(v, axis=1)
        top = tl.max(v, axis=1)
        if E // N_GROUP >= 2:
            top += tl.max(tl.where(e[None, :] == best[:, None], float("-inf"), v), axis=1)
        gscore = tl.where(g[None, :] == gi, top[:, None], gscore)
    keep = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        pick = tl.argmax(tl.where(keep > 0, float("-inf"), gscore), axis=1)
        keep = tl.where(g[None, :] == pick[:, None], 1, keep)
    keep_e = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for gi in tl.static_range(N_GROUP):
        kept = tl.max(tl.where(g[None, :] == gi, keep, 0), axis=1)            # [BT]
        keep_e = tl.where((gid == gi)[None, :] & (kept[:, None] > 0), 1, keep_e)
    masked = tl.where(keep_e > 0, choice, float("-inf"))
    slot = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    wts = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pick = tl.argmax(masked, axis=1)
        hit = e[None, :] == pick[:, None]
        wj = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        ids = tl.where(slot[None, :] == j, pick[:, None].to(tl.int64), ids)
        wts = tl.where(slot[None, :] == j, wj[:, None], wts)
        masked = tl.where(hit, float("-inf"), masked)
    if NORM:
        wts = wts / (tl.sum(wts, axis=1)[:, None] + 1e-20)
    wts = wts * routed_scale
    omask = tmask[:, None] & (slot[None, :] < TOP_K)
    tl.store(wout_ptr + tok[:, None] * TOP_K + slot[None, :], wts, mask=omask)
    tl.store(iout_ptr + tok[:, None] * TOP_K + slot[None, :], ids, mask=omask)


def moe_gate(x, weight, bias, spec, num_sms: int = 132):
    t, d = x.shape
    e = weight.shape[0]
    weights = torch.empty((t, spec.top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((t, spec.top_k), dtype=torch.int64, device=x.device)
    if t == 0:
        return weights, ids
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    block_t = 16 if t <= 256 else 64
    block_e = min(64, max(16, triton.next_power_of_2(e)))
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    tiles = triton.cdiv(t, block_t) * triton.cdiv(e, block_e)
    d_steps = triton.cdiv(d, block_d)
    splits = max(1, min(triton.cdiv(2 * num_sms, tiles), d_steps // 4))      # >= 4 D steps per program
    d_per_split = triton.cdiv(d_steps, splits) * block_d
    splits = triton.cdiv(d, d_per_split)
    part = torch.empty((splits, t, e), dtype=torch.float32, device=x.device)
    gate_logits_kernel[(triton.cdiv(t, block_t), triton.cdiv(e, block_e), splits)](
        x, weight, part, t, d, e, d_per_split, x.stride(0), weight.stride(0),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4, num_stages=3)
    moe_gate_kernel[(triton.cdiv(t, 16),)](
        part, bias if bias is not None else part, weights, ids, t, splits,
        float(spec.routed_scaling_factor), E=e, N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, TOP_K=spec.top_k,
        NORM=bool(spec.norm_topk_prob), HAS_BIAS=bias is not None, BLOCK_T=16,
        BLOCK_E=max(16, triton.next_power_of_2(e)), BLOCK_G=max(2, triton.next_power_of_2(spec.n_group)),
        BLOCK_K=max(2, triton.next_power_of_2(spec.top_k)), num_warps=4)
    return weights, ids
