"""Reference ops: plain PyTorch on any device. The oracle every backend is checked against, and the
CPU backend itself. Clarity over speed; float32 inside where precision matters."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.core.ops import ExpertWeights, GateSpec, host_syncing
from dsv3.core.quant import quantize_act_fp8
from dsv3.core.weights import QuantWeight, dequantize


def embedding(ids, weight):
    return F.embedding(ids, weight)


def rms_norm(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(x, residual, weight, eps):
    h = x + residual
    return rms_norm(h, weight, eps), h


def rope(x, positions, cos, sin):
    c = cos[positions].unsqueeze(1)                      # [T, 1, R/2]
    s = sin[positions].unsqueeze(1)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]                # interleaved pairs
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.flatten(-2).to(x.dtype)


def linear(x, w: QuantWeight):
    if w.format == "dense":
        return F.linear(x, w.data.to(x.dtype))
    xf = x.float()
    if w.ue8m0_acts:   # the checkpoint's numerics (V3.1): x quantised 1x128 with power-of-two scales
        xf = _fp8_roundtrip(xf, w.data.dtype)
    return F.linear(xf, dequantize(w)).to(x.dtype)


def _fp8_roundtrip(x, fp8_dtype):
    """x [..., K] float32 -> the values its 1x128 ue8m0 FP8 quantisation stands for."""
    shape = x.shape
    q, s = quantize_act_fp8(x.reshape(-1, shape[-1]), ue8m0=True, dtype=fp8_dtype)
    return (q.float() * s.repeat_interleave(128, dim=-1)[:, : shape[-1]]).view(shape)


def silu_mul(gate, up):
    return F.silu(gate) * up


def quantize_act(x, dtype, ue8m0):
    return quantize_act_fp8(x, ue8m0=ue8m0, dtype=dtype)


@host_syncing          # the boolean index of the kept rows is a data-dependent shape
def write_latent_cache(cache, latent, k_rope, slots):
    flat = cache.view(-1, cache.shape[-1])
    keep = slots >= 0                                  # a negative slot (a padding row) writes nothing
    width = latent.shape[-1] + k_rope.shape[-1]       # V3.2's rows go on with the indexer key
    flat[slots[keep], :width] = torch.cat((latent, k_rope), dim=-1)[keep].to(cache.dtype)


@host_syncing          # per-sequence / per-expert Python loops over device values
def mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        qb, kb, vb = (t.float().transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [H, L, d]
        scores = (qb @ kb.transpose(1, 2)) * scale                                          # [H, lq, lk]
        # query i sits at key position lk - lq + i and sees keys 0..that position
        visible = torch.arange(lk, device=q.device)[None, :] <= (torch.arange(lq, device=q.device)[:, None] + lk - lq)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vb).transpose(0, 1).to(out.dtype)
    return out


@host_syncing
def mla_decode(q_latent, q_rope, cache, block_table, context_lens, scale):
    block_size, c = cache.shape[1], q_latent.shape[-1]
    out = torch.empty_like(q_latent)
    for t, n in enumerate(context_lens.tolist()):
        blocks = block_table[t, : -(-n // block_size)]
        kv = cache[blocks].reshape(-1, cache.shape[-1])[:n].float()        # [n, C + R]
        latent, k_rope = kv[:, :c], kv[:, c:]
        scores = (q_latent[t].float() @ latent.T + q_rope[t].float() @ k_rope.T) * scale  # [H, n]
        out[t] = (scores.softmax(-1) @ latent).to(out.dtype)
    return out


def moe_gate(x, weight, bias, spec: GateSpec):
    scores = F.linear(x.float(), weight.float()).sigmoid()             # [T, E]
    choice = scores if bias is None else scores + bias.float()
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)
    group_scores = grouped.topk(min(2, e // spec.n_group), dim=-1).values.sum(-1)   # [T, n_group]
    keep = group_scores.topk(spec.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(t, e)
    ids = choice.topk(spec.top_k, dim=-1).indices                       # [T, k]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


@host_syncing
def moe_experts(x, topk_weights, topk_ids, experts: ExpertWeights):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local_ids = topk_ids - experts.first_expert
    num_local = experts.gate.data.shape[0]
    for e in torch.unique(local_ids).tolist():
        if not 0 <= e < num_local:
            continue
        token, slot = torch.nonzero(local_ids == e, as_tuple=True)
        xe = x[token]
        h = silu_mul(linear(xe, _expert(experts.gate, e)), linear(xe, _expert(experts.up, e)))
        y = linear(h, _expert(experts.down, e)).float()
        out.index_add_(0, token, y * topk_weights[token, slot].unsqueeze(-1).float())
    return out.to(x.dtype)


def _expert(w: QuantWeight, e: int) -> QuantWeight:
    return QuantWeight(w.data[e], None if w.scale is None else w.scale[e], w.format, w.act_scale_fmt)


# -- DeepSeek Sparse Attention (V3.2): dsv3.core.ops.SparseOpSpecs ---------------------------------------

@host_syncing          # the boolean index of the kept rows is a data-dependent shape
def write_index_cache(cache, index_k, slots):
    flat = cache.view(-1, cache.shape[-1])
    keep = slots >= 0
    flat[slots[keep], cache.shape[-1] - index_k.shape[-1]:] = index_k[keep].to(cache.dtype)


def index_scores(q, weights, cache, block_table, context_lens):
    t, _, di = q.shape
    n = block_table.shape[1] * cache.shape[1]
    keys = cache[block_table.long()].view(t, n, cache.shape[-1])[..., -di:].float()     # [T, N, Di]
    per_head = torch.relu(torch.einsum("thd,tnd->thn", q.float(), keys))               # [T, Hi, N]
    scores = torch.einsum("th,thn->tn", weights.float(), per_head)
    visible = torch.arange(n, device=q.device)[None, :] < context_lens[:, None]
    return scores.masked_fill(~visible, float("-inf"))


def index_topk(scores, block_table, k):
    k = min(k, scores.shape[-1])
    block_size = scores.shape[-1] // block_table.shape[1]
    values, pos = scores.topk(k, dim=-1)                                                 # [T, k]
    slots = block_table.long().gather(1, pos // block_size) * block_size + pos % block_size
    return slots.masked_fill(values == float("-inf"), -1)


def sparse_mla(q_latent, q_rope, cache, slots, scale):
    c, r = q_latent.shape[-1], q_rope.shape[-1]
    rows = cache.view(-1, cache.shape[-1])[slots.clamp_min(0)].float()                 # [T, K, W]
    latent, k_rope = rows[..., :c], rows[..., c:c + r]
    scores = (torch.einsum("thc,tkc->thk", q_latent.float(), latent)
              + torch.einsum("thr,tkr->thk", q_rope.float(), k_rope)) * scale           # [T, H, K]
    scores = scores.masked_fill((slots < 0)[:, None, :], float("-inf"))
    return torch.einsum("thk,tkc->thc", scores.softmax(-1), latent).to(q_latent.dtype)


SPARSE_OPS = {name: globals()[name] for name in ("write_index_cache", "index_scores", "index_topk", "sparse_mla")}

OPS = {name: globals()[name] for name in (
    "embedding", "rms_norm", "add_rms_norm", "rope", "linear", "silu_mul", "quantize_act",
    "write_latent_cache", "mla_prefill", "mla_decode", "moe_gate", "moe_experts")}
