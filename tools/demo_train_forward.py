"""A training-only forward of dsv3.core.model.DeepseekV3 over packed rows: the same parameters, the same
arithmetic as the model's forward through the reference ops, written for autograd on a GPU.

The model's own forward runs a flat batch through a paged latent cache: per-sequence Python loops
in `mla_prefill`, one `nonzero` per expert in `moe_experts`, a host sync for every cache write. Fine
for inference, slow under autograd. Here a step is a [B, L] block of packed rows (each row several
documents' segments, each segment starting with BOS at position 0):

- MLA as the model's naive path computes it: q = q_b(norm(q_a(x))), [latent | k_rope] = kv_a(x), the
  latent normed, kv_b(latent) -> per-head k_nope and v, k_rope shared by the heads, interleaved YaRN
  RoPE, softmax scale with YaRN's mscale; attention by scaled_dot_product_attention with a mask that is
  causal within each segment.
- The noaux_tc gate as `moe_gate`, experts as one padded batched matmul per projection (tokens sorted
  by expert into [E, max count, D]; padding rows are zeros and dropped), shared expert added.
- The MTP module as `mtp_hidden`: slot i of a segment reads (h_i, token i+1) at RoPE position i and
  predicts token i+2, attending within its own segment.

`tests/test_demo_corpus.py` checks the logits against the model's forward on a tiny config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.core.model import MLA, MLP, Block, DeepseekV3, MoE


def rms(x, weight, eps):
    """The reference rms_norm: float32 inside, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope(x, cos, sin):
    """x [B, L, H, R] with interleaved pairs; cos, sin [B, L, R/2] (already at each token's position)."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)


def linear(x, module):
    return F.linear(x, module.weight.to(x.dtype))


def attention(m: MLA, x, cos, sin, mask):
    """x [B, L, D] -> [B, L, D]; mask [B, 1, L, L] True where a query may see a key."""
    b, l, _ = x.shape
    h, nope, r, v_dim, c = m.n_heads, m.nope, m.rope_dim, m.v_dim, m.kv_rank
    if m.cfg.q_lora_rank is None:
        q = linear(x, m.q_proj)
    else:
        q = linear(rms(linear(x, m.q_a_proj), m.q_a_layernorm.weight, m.q_a_layernorm.eps), m.q_b_proj)
    q = q.view(b, l, h, nope + r)
    q_nope, q_rope = q.split([nope, r], dim=-1)
    q_rope = rope(q_rope, cos, sin)
    latent, k_rope = linear(x, m.kv_a_proj_with_mqa).split([c, r], dim=-1)
    latent = rms(latent, m.kv_a_layernorm.weight, m.kv_a_layernorm.eps)
    k_rope = rope(k_rope.unsqueeze(2), cos, sin)                                   # [B, L, 1, R]
    k_nope, v = linear(latent, m.kv_b_proj).view(b, l, h, nope + v_dim).split([nope, v_dim], dim=-1)
    qh = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)                        # [B, H, L, nope + R]
    kh = torch.cat((k_nope, k_rope.expand(-1, -1, h, -1)), dim=-1).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, v.transpose(1, 2), attn_mask=mask, scale=m.softmax_scale)
    return linear(out.transpose(1, 2).reshape(b, l, h * v_dim), m.o_proj)


def mlp(m: MLP, x):
    return linear(F.silu(linear(x, m.gate_proj)) * linear(x, m.up_proj), m.down_proj)


def gate(m, x, counts_out: list | None):
    """The reference moe_gate (noaux_tc), differentiable in the affinities: (weights [T, k], ids [T, k])."""
    spec = m.spec
    scores = F.linear(x.float(), m.weight.float()).sigmoid()                       # [T, E]
    choice = scores.detach() + m.e_score_correction_bias.float()
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)
    group_scores = grouped.topk(min(2, e // spec.n_group), dim=-1).values.sum(-1)
    keep = group_scores.topk(spec.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(t, e)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


def moe(m: MoE, x, loads: list | None):
    """x [T, D] -> [T, D]: routed experts as padded batched matmuls, plus the shared expert.
    Appends each call's per-expert token counts to `loads` (the loss-free balancing reads them)."""
    t, d = x.shape
    weights, ids = gate(m.gate, x, loads)
    k = ids.shape[1]
    e_count = m.experts.gate_proj.weight.shape[0]
    flat = ids.flatten()                                                            # [T*k]
    counts = torch.bincount(flat, minlength=e_count)
    if loads is not None:
        loads.append(counts)
    order = flat.argsort(stable=True)
    expert = flat[order]
    rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
    token = order // k
    cap = int(counts.max())                                                         # one host sync per layer
    buf = x.new_zeros(e_count, cap, d)
    buf[expert, rank] = x[token]
    wg, wu, wd = (p.weight.to(x.dtype) for p in (m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj))
    hidden = F.silu(torch.bmm(buf, wg.transpose(1, 2))) * torch.bmm(buf, wu.transpose(1, 2))
    y = torch.bmm(hidden, wd.transpose(1, 2))[expert, rank].float()                 # [T*k, D]
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y * weights.flatten()[order].unsqueeze(-1))
    out = out.to(x.dtype)
    return out if m.shared_experts is None else out + mlp(m.shared_experts, x)


def block(layer: Block, x, residual, cos, sin, mask, loads):
    """The model's Block (pre-norm, the residual added inside the next norm), on [B, L, D]."""
    ln = layer.input_layernorm
    if residual is None:
        x, residual = rms(x, ln.weight, ln.eps), x
    else:
        residual = x + residual
        x = rms(residual, ln.weight, ln.eps)
    x = attention(layer.self_attn, x, cos, sin, mask)
    residual = x + residual
    x = rms(residual, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    b, l, d = x.shape
    if isinstance(layer.mlp, MoE):
        x = moe(layer.mlp, x.reshape(b * l, d), loads).view(b, l, d)
    else:
        x = mlp(layer.mlp, x)
    return x, residual


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [B, L] (segment index per slot, -1 padding) -> [B, 1, L, L]: causal within a segment.
    A padding slot sees itself only (its output is never used, but it must not be all -inf)."""
    l = segments.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    eye = torch.eye(l, dtype=torch.bool, device=segments.device)
    return ((same & causal) | eye).unsqueeze(1)


def forward(model: DeepseekV3, ids, positions, segments, loads: list | None = None, dtype=None):
    """ids, positions, segments [B, L] -> (main hidden [B, L, D] after the final norm, MTP hidden
    [B, L, D]): MTP slot j of a segment holds the module's state for (h_j, token j+1)."""
    cfg = model.cfg
    cos_t, sin_t = model.rope_tables(ids.device)
    cos, sin = cos_t[positions], sin_t[positions]                                   # [B, L, R/2]
    mask = segment_mask(segments)
    emb = model.model.embed_tokens.weight
    x = F.embedding(ids, emb)
    if dtype is not None:
        x = x.to(dtype)
    residual = None
    for i in range(cfg.num_hidden_layers):
        x, residual = block(model.model.layers[i], x, residual, cos, sin, mask, loads)
    norm = model.model.norm
    hidden = rms(x + residual, norm.weight, norm.eps)
    if not model.has_mtp:
        return hidden, None
    mtp = model.mtp
    next_ids = torch.cat((ids[:, 1:], ids[:, -1:]), dim=1)                         # token j+1 at slot j
    e = F.embedding(next_ids, mtp.embed_tokens.weight).to(hidden.dtype)
    x = linear(torch.cat((rms(e, mtp.enorm.weight, mtp.enorm.eps), rms(hidden, mtp.hnorm.weight, mtp.hnorm.eps)),
                         dim=-1), mtp.eh_proj)
    x, residual = block(mtp, x, None, cos, sin, mask, loads)
    h = mtp.shared_head.norm
    return hidden, rms(x + residual, h.weight, h.eps)


def targets(ids, segments):
    """(main targets, MTP targets) [B, L]: token j+1 / token j+2 of the same segment, else -100."""
    pad = torch.full_like(ids[:, :1], -100)
    seg_pad = torch.full_like(segments[:, :1], -2)
    nxt = torch.cat((ids[:, 1:], pad), 1)
    nxt_seg = torch.cat((segments[:, 1:], seg_pad), 1)
    main = nxt.masked_fill((nxt_seg != segments) | (segments < 0), -100)
    nxt2 = torch.cat((ids[:, 2:], pad, pad), 1)
    nxt2_seg = torch.cat((segments[:, 2:], seg_pad, seg_pad), 1)
    mtp = nxt2.masked_fill((nxt2_seg != segments) | (segments < 0), -100)
    return main, mtp


def joint_loss(model: DeepseekV3, ids, positions, segments, loads=None, dtype=None):
    """(main CE, MTP CE), means over the predicted tokens of the block."""
    hidden, mtp_hidden = forward(model, ids, positions, segments, loads, dtype)
    main_t, mtp_t = targets(ids, segments)
    head = model.lm_head.weight
    main = F.cross_entropy(F.linear(hidden, head.to(hidden.dtype)).float().flatten(0, 1), main_t.flatten(),
                           ignore_index=-100)
    if mtp_hidden is None:
        return main, main.new_zeros(())
    mhead = model.mtp.shared_head.head.weight
    mtp = F.cross_entropy(F.linear(mtp_hidden, mhead.to(mtp_hidden.dtype)).float().flatten(0, 1), mtp_t.flatten(),
                          ignore_index=-100)
    return main, mtp
