"""noaux_tc MoE routing in one launch: logits, sigmoid, biased group-limited top-k, weights.

x [T, D] @ W^T [D, E] with fp32 accumulation (bf16 products are exact in fp32, as in the
reference's float32 matmul), s = sigmoid; choose with s + bias: group score = sum of the top-2
biased scores of each group, keep `topk_group` groups, take the top-k experts of those; weights are
the unbiased s of the chosen experts, normalised and scaled.

Decode reads the 3.7 MB gate matrix with the whole GPU: the grid is (token tiles x expert tiles x
D splits), each program writes fp32 partial logits. The last program of a token tile to finish (an
atomic count per tile, reset by that program) sums the partials in split order, so the logits do not
depend on timing, and routes the tile's tokens. One launch instead of two: inside a CUDA graph the
second launch's latency was most of the op's time at T <= 64.
"""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl
from dsv3.backends.triton.counters import tile_counters


@triton.jit
def moe_gate_kernel(x_ptr, w_ptr, bias_ptr, part_ptr, count_ptr, wout_ptr, iout_ptr, T, D, d_per_split,
                    stride_x, stride_w, routed_scale,
                    E: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_D: tl.constexpr, ROUTE_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    EPG: tl.constexpr = E // N_GROUP
    pid_t, pid_e, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # 1. partial logits part[s, t, e] over this split's slice of D
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.arange(0, BLOCK_D)
    tmask, emask = tok < T, e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    d_end = tl.minimum(s * d_per_split + d_per_split, D)
    if PDL:   # the gate matrix is no kernel's output: its lines (64 bf16 each) head for L2 before the wait
        line = tl.arange(0, BLOCK_D // 64) * 64
        rows = w_ptr + tl.minimum(e, E - 1)[:, None] * stride_w
        for d0 in range(s * d_per_split, d_end, BLOCK_D):
            pdl.prefetch_l2(rows + tl.minimum(d0 + line, D - 1)[None, :])
    pdl.start(PDL)
    for d0 in range(s * d_per_split, d_end, BLOCK_D):
        dm = d0 + d < d_end
        xs = tl.load(x_ptr + tok[:, None] * stride_x + d0 + d[None, :], mask=tmask[:, None] & dm[None, :], other=0.0)
        ws = tl.load(w_ptr + e[:, None] * stride_w + d0 + d[None, :], mask=emask[:, None] & dm[None, :], other=0.0)
        acc += tl.dot(xs, tl.trans(ws))
    tl.store(part_ptr + (s * T + tok[:, None]) * E + e[None, :], acc, mask=tmask[:, None] & emask[None, :])
    # 2. the tile's last program routes its tokens (release: this program's stores before the count;
    #    acquire: the others' stores before the reads below, which bypass L1)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(1) * SPLITS - 1:
        g = tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_EG)
        expert = g[:, None] * EPG + j[None, :]                                           # [BG, BEG]
        valid = (g[:, None] < N_GROUP) & (j[None, :] < EPG)
        flat = tl.reshape(g[:, None] * BLOCK_EG + j[None, :], (BLOCK_G * BLOCK_EG,))    # position in the flat view
        bias = tl.zeros((BLOCK_G, BLOCK_EG), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
        slot = tl.arange(0, BLOCK_K)
        for r0 in range(0, tl.minimum(BLOCK_T, T - pid_t * BLOCK_T), ROUTE_T):   # only rows that exist
            rt = pid_t * BLOCK_T + r0 + tl.arange(0, ROUTE_T)
            rmask = rt < T
            m3 = rmask[:, None, None] & valid[None, :, :]
            logits = tl.zeros((ROUTE_T, BLOCK_G, BLOCK_EG), dtype=tl.float32)
            for sp in tl.static_range(SPLITS):       # unrolled: the loads are in flight together
                logits += tl.load(part_ptr + (sp * T + rt[:, None, None]) * E + expert[None, :, :], mask=m3,
                                  other=0.0, cache_modifier=".cg")
            scores = tl.sigmoid(logits)                                                  # [RT, BG, BEG]
            choice = tl.where(m3, scores + bias[None, :, :], float("-inf"))
            # group score = sum of the group's top-2 biased scores (ties: the first index, as argmax)
            top1 = tl.max(choice, axis=2)                                                # [RT, BG]
            if EPG >= 2:
                arg1 = tl.argmax(choice, axis=2)
                top1 += tl.max(tl.where(j[None, None, :] == arg1[:, :, None], float("-inf"), choice), axis=2)
            gs = tl.where((g < N_GROUP)[None, :], top1, float("-inf"))
            # keep the topk_group best groups: rank = groups ahead of g (higher score, or equal and earlier)
            ahead = (gs[:, None, :] > gs[:, :, None]) | ((gs[:, None, :] == gs[:, :, None]) &
                                                          (g[None, None, :] < g[None, :, None]))
            keep = tl.sum(ahead.to(tl.int32), axis=2) < TOPK_GROUP                        # [RT, BG]
            masked = tl.where(keep[:, :, None], choice, float("-inf"))
            # top-k over the kept experts, in the flat view; one max per pick (value and first index packed)
            bits = tl.reshape(masked, (ROUTE_T, BLOCK_G * BLOCK_EG)).to(tl.int32, bitcast=True)
            order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)           # sorts as the floats do
            key = order * 65536 + (65535 - flat[None, :])
            sflat = tl.reshape(scores, (ROUTE_T, BLOCK_G * BLOCK_EG))
            ids = tl.zeros((ROUTE_T, BLOCK_K), dtype=tl.int64)
            wts = tl.zeros((ROUTE_T, BLOCK_K), dtype=tl.float32)
            for kk in tl.static_range(TOP_K):
                best = tl.max(key, axis=1)                                               # [RT]
                hit = key == best[:, None]
                wk = tl.sum(tl.where(hit, sflat, 0.0), axis=1)
                pos = 65535 - (best & 0xFFFF).to(tl.int32)                                 # flat position picked
                ek = pos // BLOCK_EG * EPG + pos % BLOCK_EG
                ids = tl.where(slot[None, :] == kk, ek[:, None].to(tl.int64), ids)
                wts = tl.where(slot[None, :] == kk, wk[:, None], wts)
                key = tl.where(hit, -9223372036854775807, key)
            if NORM:
                wts = wts / (tl.sum(wts, axis=1)[:, None] + 1e-20)
            wts = wts * routed_scale
            omask = rmask[:, None] & (slot[None, :] < TOP_K)
            tl.store(wout_ptr + rt[:, None] * TOP_K + slot[None, :], wts, mask=omask)
            tl.store(iout_ptr + rt[:, None] * TOP_K + slot[None, :], ids, mask=omask)
        tl.store(count_ptr + pid_t, 0)                          # ready for the next launch


def gate_config(t: int, e: int, d: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_D, D splits, ROUTE_T, num_warps): ~1-2 waves of programs, narrow expert
    tiles at decode, and few D splits, since the routing program reads every split's partials (8 at one
    token, else 4)."""
    block_t = 16 if t <= 256 else 64
    block_e = min(16 if t <= 64 else 64, max(16, triton.next_power_of_2(e)))
    tiles = triton.cdiv(t, block_t) * triton.cdiv(e, block_e)
    route_t = 1 if t == 1 else 8     # (routing 2 rows at a time gave wrong ids with Triton 3.6 on sm_90)
    splits = max(1, min(triton.cdiv(2 * num_sms, tiles), 8 if route_t == 1 else 4, triton.cdiv(d, 256)))
    block_d = min(256 if block_t == 16 else 128, max(16, triton.next_power_of_2(d)))   # 64x64 tiles: shared memory
    # one token: 2 warps route a [1, 8, 32] tile faster than 4 (H200: 7.3 vs 8.1 us); 8-row tiles want 4
    return block_t, block_e, block_d, splits, route_t, 2 if route_t == 1 else 4


def moe_gate(x, weight, bias, spec, num_sms: int = 132, batch_invariant: bool = False, launch_pdl: bool = False):
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
    # batch-invariant: one token's tiling, so every token's logits sum the same D splits in the same order
    block_t, block_e, block_d, splits, route_t, warps = gate_config(1 if batch_invariant else t, e, d, num_sms)
    d_per_split = triton.cdiv(triton.cdiv(d, block_d), splits) * block_d
    splits = triton.cdiv(d, d_per_split)
    part = torch.empty((splits, t, e), dtype=torch.float32, device=x.device)
    t_tiles = triton.cdiv(t, block_t)
    moe_gate_kernel[(t_tiles, triton.cdiv(e, block_e), splits)](
        x, weight, bias if bias is not None else part, part, tile_counters(x.device, t_tiles), weights, ids,
        t, d, d_per_split, x.stride(0), weight.stride(0), float(spec.routed_scaling_factor),
        E=e, N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, TOP_K=spec.top_k, NORM=bool(spec.norm_topk_prob),
        HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, ROUTE_T=route_t,
        BLOCK_G=triton.next_power_of_2(spec.n_group), BLOCK_EG=triton.next_power_of_2(e // spec.n_group),
        BLOCK_K=max(2, triton.next_power_of_2(spec.top_k)), SPLITS=splits, **pdl.launch_options(launch_pdl),
        num_warps=warps, num_stages=3)
    return weights, ids
