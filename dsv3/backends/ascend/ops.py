"""The `ascend` op table: torch_npu's fused kernels where their documented constraints hold.

Imported only when the ascend backend is chosen (it imports torch_npu). Nothing here has run on an
NPU: every torch_npu call is written against the documentation cited next to it and tested against
the CPU emulation in dsv3.backends.ascend.emulation (see README.md). Ops that need no vendor kernel
(embedding, rope, silu_mul, the cache write) are plain torch, which torch_npu runs on the NPU.

Each fused path checks the constraints its document states and otherwise falls back to the plain
torch composition of the reference op (as vLLM-Ascend does for npu_moe_gating_top_k); the tiny
test models hit both paths. Tensors stay on the device they arrive on; nothing here names a device.

Docs (OP_PLUGIN = https://github.com/Ascend/op-plugin/blob/master/docs/context/, the source of the
hiascend.com torch_npu API reference; signatures cross-checked with the torch_npu 2.13.0 wheel):
  npu_dynamic_quant            OP_PLUGIN torch_npu-npu_dynamic_quant.md
  npu_quant_matmul             OP_PLUGIN torch_npu-npu_quant_matmul.md,
                               https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000172.html
  npu_rms_norm                 https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
  npu_add_rms_norm             torch_npu 2.13.0 schema; Ascend/op-plugin test/test_custom_ops/test_npu_add_rms_norm.py
  npu_moe_gating_top_k         OP_PLUGIN torch_npu-npu_moe_gating_top_k.md,
                               https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_002365.html
  npu_moe_init_routing_v2      OP_PLUGIN torch_npu-npu_moe_init_routing_v2.md
  npu_grouped_matmul           OP_PLUGIN torch_npu-npu_grouped_matmul.md
  npu_fused_infer_attention_score  OP_PLUGIN torch_npu-npu_fused_infer_attention_score.md
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torch_npu

from dsv3.backends.ascend import EMULATION_ENV
from dsv3.backends.reference import ops as ref
from dsv3.core.errors import PluginError
from dsv3.core.ops import ExpertWeights, GateSpec
from dsv3.core.weights import QuantWeight

_HALF = (torch.float16, torch.bfloat16)


def _check_torch_npu() -> None:
    emulated = getattr(torch_npu, "__dsv3_emulation__", False)
    wanted = os.environ.get(EMULATION_ENV) == "1"
    if emulated and not wanted:
        raise PluginError(f"the torch_npu on this path is dsv3's CPU emulation ({torch_npu.__file__}); set "
                          f"{EMULATION_ENV}=1 to run emulated (results are not NPU results), or remove it from "
                          f"PYTHONPATH to use the real torch_npu")
    if wanted and not emulated:
        raise PluginError(f"{EMULATION_ENV}=1 but the importable torch_npu is the real one ({torch_npu.__file__}); "
                          f"unset {EMULATION_ENV} to run on the NPU")


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The half dtype a kernel that takes only float16/bfloat16 runs x in (float32 runs as bfloat16)."""
    return x.dtype if x.dtype in _HALF else torch.bfloat16


# --- norms ----------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    # npu_rms_norm(self, gamma, epsilon) -> (y, rstd); gamma must have x's dtype (ptaoplist_000860)
    return torch_npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def add_rms_norm(x, residual, weight, eps):
    # npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)  (wheel schema, op-plugin test golden)
    y, _, h = torch_npu.npu_add_rms_norm(x, residual, weight.to(x.dtype), epsilon=eps)
    return y, h


# --- linear ---------------------------------------------------------------------------------------
def _w8a8(x2d: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[T, K] activations x int8 [N, K] weight with float32 [N] scale -> [T, N] in out_dtype."""
    # npu_dynamic_quant(x) -> (int8 [T, K], float32 [T]); x must be float16/bfloat16
    xq, x_scale = torch_npu.npu_dynamic_quant(x2d)
    # npu_quant_matmul(x1, x2, scale, *, pertoken_scale, output_dtype): the doc's dtype table allows
    # (int8, int8, float32 scale, float32 pertoken) -> bfloat16 or float16; x2 as the [K, N]
    # transposed view of the [N, K] weight, as the doc's bfloat16 example passes x2.t()
    return torch_npu.npu_quant_matmul(xq, data.t(), scale, pertoken_scale=x_scale, output_dtype=out_dtype)


def linear(x, w: QuantWeight):
    if w.format == "dense":
        return F.linear(x, w.data.to(x.dtype))        # BF16 linear: aten matmul, run by torch_npu on the NPU
    if w.format != "int8-w8a8":
        raise PluginError(f"backend 'ascend' has no linear for weight format {w.format!r}; it runs dense "
                          f"and int8-w8a8 (set weight_format in the profile, or convert at load)")
    kd = _kernel_dtype(x)
    y = _w8a8(x.reshape(-1, x.shape[-1]).to(kd), w.data, w.scale.float(), kd)
    return y.view(*x.shape[:-1], w.out_features).to(x.dtype)


# --- MoE ------------------------------------------------------------------------------------------
def _gating_fits(e: int, spec: GateSpec) -> bool:
    """npu_moe_gating_top_k's documented limits (torch_npu doc; Atlas A2/A3)."""
    g = spec.n_group
    if g <= 0 or e % g or e > 2048:
        return False
    per = e // g
    return per > 2 and -(-per // 32) * 32 * g <= 2048 and 1 <= spec.topk_group <= g and \
        1 <= spec.top_k <= per * spec.topk_group


def moe_gate(x, weight, bias, spec: GateSpec):
    logits = F.linear(x.float(), weight.float())                        # [T, E] float32, as the reference
    e = logits.shape[-1]
    if not _gating_fits(e, spec):
        return ref.moe_gate(x, weight, bias, spec)
    bias = logits.new_zeros(e) if bias is None else bias.float()     # bias dtype must equal x's
    # npu_moe_gating_top_k(x, k, *, bias, k_group, group_count, group_select_mode=1 (top-2 sum),
    # renorm=0, norm_type=1 (sigmoid), out_flag, routed_scaling_factor, eps): expert ids from
    # sigmoid + bias, weights from the unbiased sigmoid, normalised to sum 1 (always, for sigmoid)
    # and scaled. Without norm_topk_prob we take normOut (out_flag) and scale it ourselves.
    y, ids, norm = torch_npu.npu_moe_gating_top_k(
        logits, spec.top_k, bias=bias, k_group=spec.topk_group, group_count=spec.n_group, group_select_mode=1,
        renorm=0, norm_type=1, out_flag=not spec.norm_topk_prob,
        routed_scaling_factor=spec.routed_scaling_factor, eps=1e-20)
    ids = ids.long()
    weights = y.float() if spec.norm_topk_prob else norm.gather(1, ids) * spec.routed_scaling_factor
    return weights, ids


def moe_experts(x, topk_weights, topk_ids, experts: ExpertWeights):
    """Routed experts as three grouped GEMMs over tokens sorted by expert.

    npu_moe_init_routing_v2 sorts the (token, slot) pairs by expert and, for W8A8, quantises each
    row to int8 on the way; npu_grouped_matmul runs gate, up and down per expert group; the weighted
    sum back into tokens is plain torch. Gate and up are two GEMMs on the same rows (fusing them
    into one [E, D, 2I] weight at load would save one pass; see README).
    """
    t, k = topk_ids.shape
    gate, up, down = experts.gate, experts.up, experts.down
    if gate.format not in ("dense", "int8-w8a8"):
        raise PluginError(f"backend 'ascend' has no experts for weight format {gate.format!r}")
    quantised = gate.format == "int8-w8a8"
    e = gate.data.shape[0]
    kd = _kernel_dtype(x) if quantised else x.dtype
    # Expert parallelism: ids this rank does not hold become the sentinel e, outside active range [0, e)
    local = topk_ids - experts.first_expert
    local = torch.where((local >= 0) & (local < e), local, e).to(torch.int32)          # [T, k]
    # npu_moe_init_routing_v2(x, expert_idx, *, active_num=N*K (checked), expert_capacity (unused),
    # expert_num, drop_pad_mode=0, expert_tokens_num_type=1 (count), expert_tokens_num_flag=True,
    # quant_mode=1 (dynamic int8) | -1, active_expert_range=[start, end), row_idx_type=0 (gather))
    # -> (expanded_x [T*k, D], expanded_row_idx [T*k], tokens per expert [e] int64, expanded_scale [T*k])
    xs, row_idx, counts, row_scale = torch_npu.npu_moe_init_routing_v2(
        x.to(kd), local, active_num=t * k, expert_capacity=-1, expert_num=e + 1, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=1 if quantised else -1,
        active_expert_range=[0, e], row_idx_type=0)
    # npu_grouped_matmul needs the groups to cover x exactly: drop the rows of other ranks' experts
    # (one host sync; on a single rank n == T*k)
    n = int(counts.sum())
    if n == 0:
        return torch.zeros_like(x)
    xs, row_scale = xs[:n], row_scale[:n]
    h = silu_mul(_grouped(xs, row_scale, gate, counts, kd), _grouped(xs, row_scale, up, counts, kd))
    if quantised:
        hq, h_scale = torch_npu.npu_dynamic_quant(h)               # per-row int8 for the down GEMM
        y = _grouped(hq, h_scale, down, counts, kd)                 # [n, D]
    else:
        y = _grouped(h, None, down, counts, kd)
    # weighted sum back into tokens: slot (t, j) sits at row row_idx[t*k + j] of y, -1 if not ours
    rows = row_idx.view(t, k).long()
    held = rows >= 0
    picked = y[rows.clamp(min=0)].float()                           # [T, k, D]
    w = topk_weights.float().unsqueeze(-1)
    out = torch.where(held.unsqueeze(-1), picked * w, 0.0).sum(1)
    return out.to(x.dtype)


def _grouped(a, a_scale, w: QuantWeight, counts, kd):
    """One grouped GEMM: rows of `a` grouped by `counts` (tokens per expert) x w [E, N, K] -> [rows, N]."""
    # npu_grouped_matmul(x=[a], weight=[w^T view [E, K, N]], *, scale=[[E, N]], per_token_scale=[[rows]],
    # group_list=counts, split_item=2 (one output tensor), group_type=0 (split M), group_list_type=1
    # (counts), output_dtype): doc's dtype table: int8 x int8, bfloat16 scale, float32 per-token scale
    # -> bfloat16 (float32 scale -> float16); float x float of one dtype -> that dtype
    if w.format == "int8-w8a8":
        scale = w.scale.to(torch.bfloat16) if kd == torch.bfloat16 else w.scale.float()
        return torch_npu.npu_grouped_matmul(
            [a], [w.data.transpose(1, 2)], scale=[scale], per_token_scale=[a_scale], group_list=counts,
            split_item=2, group_type=0, group_list_type=1, output_dtype=kd)[0]
    return torch_npu.npu_grouped_matmul(
        [a], [w.data.to(a.dtype).transpose(1, 2)], group_list=counts, split_item=2, group_type=0,
        group_list_type=1)[0]


# --- attention ------------------------------------------------------------------------------------
def _decode_fits(q_latent, q_rope, cache, block_table) -> bool:
    """npu_fused_infer_attention_score's MLA mode: query D 512, rope D 64, N in {32, 64, 128},
    paged blocks of 16 or 128, float16/bfloat16."""
    return (q_latent.shape[-1] == 512 and q_rope.shape[-1] == 64 and q_latent.shape[1] in (32, 64, 128)
            and cache.shape[1] in (16, 128) and q_latent.dtype in _HALF and cache.dtype == q_latent.dtype
            and block_table.shape[0] > 0)


def mla_decode(q_latent, q_rope, cache, block_table, context_lens, scale):
    """Absorbed MLA decode over the paged latent cache.

    Layout mismatch: the fused kernel's MLA mode takes the latent and the rope key as two separate
    contiguous paged tensors ([blocks, block_size, 512] and [blocks, block_size, 64]) and rejects
    non-contiguous ones; our cache interleaves them per token ([blocks, block_size, 576]), so the
    slices are strided. We gather the blocks this step reads into two contiguous tensors and renumber
    the block table: one extra copy of the attended context per layer and step. Splitting the cache
    into two tensors (a core change) would remove it.
    """
    if not _decode_fits(q_latent, q_rope, cache, block_table):
        return ref.mla_decode(q_latent, q_rope, cache, block_table, context_lens, scale)
    t, h, c = q_latent.shape
    used = cache[block_table.flatten().long()]                          # [T * max_blocks, bs, C + R]
    latent, k_rope = used[..., :c].contiguous(), used[..., c:].contiguous()
    table = torch.arange(used.shape[0], dtype=torch.int32, device=cache.device).view(block_table.shape)
    # npu_fused_infer_attention_score(query [B, N, 1, 512] BNSD, key = value = latent [blocks, bs, 512],
    # *, query_rope [B, N, 1, 64], key_rope [blocks, bs, 64], num_heads, num_key_value_heads=1,
    # input_layout="BNSD", scale, sparse_mode=0 (no mask at Q_S = 1), block_table, block_size,
    # actual_seq_lengths_kv): one batch per decode token, each with its own block row and length
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q_latent.unsqueeze(2).contiguous(), latent, latent, query_rope=q_rope.unsqueeze(2).contiguous(),
        key_rope=k_rope, num_heads=h, num_key_value_heads=1, input_layout="BNSD", scale=scale, sparse_mode=0,
        block_table=table, block_size=cache.shape[1], actual_seq_lengths_kv=context_lens.tolist())
    return out.squeeze(2)                                                 # [T, H, C]


def _prefill_fits(q, k, v, num_seqs: int) -> bool:
    """The TND mode without rope: bfloat16, Q_D = K_D = 192 with V_D 128|192 (or all 128), equal head
    counts N in {2, ..., 128}, at most 4096 sequences."""
    dims_ok = (q.shape[-1], k.shape[-1]) == (192, 192) and v.shape[-1] in (128, 192) or \
        (q.shape[-1], k.shape[-1], v.shape[-1]) == (128, 128, 128)
    return dims_ok and q.dtype == torch.bfloat16 and q.shape[1] in (2, 4, 8, 16, 32, 64, 128) and \
        num_seqs <= 4096


def make_mla_prefill():
    masks: dict[torch.device, torch.Tensor] = {}    # the optimised causal mask, built once per device

    def mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        if not _prefill_fits(q, k, v, cu_seqlens_q.numel() - 1):
            return ref.mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
        mask = masks.get(q.device)
        if mask is None:
            # sparse_mode 3 (rightDownCausal) takes a fixed 2048x2048 mask; 1 = masked out
            mask = masks[q.device] = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
        # npu_fused_infer_attention_score(query [Tq, N, 192], key [Tk, N, 192], value [Tk, N, 128],
        # *, input_layout="TND", actual_seq_lengths / actual_seq_lengths_kv = cumulative ends per
        # sequence, sparse_mode=3 with the mask: query i of a sequence sees keys up to
        # i + kv_len - q_len, i.e. queries aligned to the end of their keys, as our contract says
        out, _ = torch_npu.npu_fused_infer_attention_score(
            q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=mask,
            actual_seq_lengths=cu_seqlens_q[1:].tolist(), actual_seq_lengths_kv=cu_seqlens_k[1:].tolist(),
            num_heads=q.shape[1], num_key_value_heads=q.shape[1], input_layout="TND", scale=scale, sparse_mode=3)
        return out

    return mla_prefill


# --- plain torch (no vendor kernel needed) ----------------------------------------------------------
embedding = ref.embedding
rope = ref.rope
silu_mul = ref.silu_mul
write_latent_cache = ref.write_latent_cache


def ascend_ops() -> dict:
    """{op name: callable}. quantize_act (FP8) is absent: Atlas A2 has no FP8, the reference op serves."""
    _check_torch_npu()
    return {"embedding": embedding, "rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rope": rope,
            "linear": linear, "silu_mul": silu_mul, "write_latent_cache": write_latent_cache,
            "mla_prefill": make_mla_prefill(), "mla_decode": mla_decode, "moe_gate": moe_gate,
            "moe_experts": moe_experts}
