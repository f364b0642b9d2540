"""Pin the torch_npu emulation to the documented semantics (EMULATED kernels; no NPU involved).

Each test states the documented rule it checks: shapes, output dtypes, int8 rounding, int32 sums,
the routing rules of npu_moe_gating_top_k, and the constraints the docs say the kernels enforce.
"""
import pytest
import torch

from dsv3.backends.ascend.emulation import kernels as npu
from dsv3.backends.ascend.emulation.kernels import EmulationError
from dsv3.backends.reference import ops as ref
from dsv3.core.ops import GateSpec


# --- npu_dynamic_quant ----------------------------------------------------------------------------
def test_dynamic_quant_rounds_half_to_even_per_token():
    # row amax 127 -> scale exactly 1, so x / scale keeps the .5 ties (bf16 holds them exactly)
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.5], [-63.5, 1.0, 0.25, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y, scale = npu.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (2,)
    assert y[0].tolist() == [127, 2, 4, -2, 0, 0]                 # half to even, not away from zero
    assert scale[1].item() == pytest.approx(63.5 / 127) and y[1, 0].item() == -127


def test_dynamic_quant_shape_zero_row_and_dtype_rules():
    x = torch.randn(2, 3, 16, dtype=torch.float16)
    x[1, 2] = 0
    y, scale = npu.npu_dynamic_quant(x)
    assert y.shape == x.shape and scale.shape == (2, 3)           # scale: x's shape without the last dim
    assert scale[1, 2].item() == 1.0 and not y[1, 2].any()         # all-zero row: scale 1, zeros
    with pytest.raises(EmulationError, match="float16 or bfloat16"):
        npu.npu_dynamic_quant(torch.randn(2, 4))


# --- npu_quant_matmul -----------------------------------------------------------------------------
def test_quant_matmul_is_exact_int32_sum_then_scales():
    g = torch.Generator().manual_seed(0)
    m, k, n = 5, 4096, 24
    x1 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)   # [n, k] as weights are stored
    x1[0] = 127
    w[0] = 127                                                            # 127*127*4096 > 2^24: float32 sums would round
    scale, tok = torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5
    out = npu.npu_quant_matmul(x1, w.t(), scale, pertoken_scale=tok, output_dtype=torch.bfloat16)
    exact = (x1.long() @ w.long().t())                                     # int64: the exact sums
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    expected = (exact.to(torch.int32).float() * scale * tok[:, None]).to(torch.bfloat16)
    assert torch.equal(out, expected)
    out16 = npu.npu_quant_matmul(x1, w.t(), scale, pertoken_scale=tok, output_dtype=torch.float16)
    assert out16.dtype == torch.float16


def test_quant_matmul_dtype_table():
    x1, x2 = torch.ones(2, 8, dtype=torch.int8), torch.ones(8, 3, dtype=torch.int8)
    tok = torch.ones(2)
    with pytest.raises(EmulationError, match="float16 output"):       # fp16 out + pertoken needs a float32 scale
        npu.npu_quant_matmul(x1, x2, torch.ones(3, dtype=torch.bfloat16), pertoken_scale=tok,
                             output_dtype=torch.float16)
    with pytest.raises(EmulationError, match="bfloat16 or float16"):
        npu.npu_quant_matmul(x1, x2, torch.ones(3), pertoken_scale=tok, output_dtype=torch.float32)
    with pytest.raises(EmulationError, match="scale must be 1-D"):
        npu.npu_quant_matmul(x1, x2, torch.ones(2), pertoken_scale=tok, output_dtype=torch.bfloat16)


# --- norms ----------------------------------------------------------------------------------------
def test_rms_norm_and_add_rms_norm():
    x, r = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    g = (1 + 0.1 * torch.randn(32)).to(torch.bfloat16)
    y, rstd = npu.npu_rms_norm(x, g, epsilon=1e-6)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (4, 1)
    assert torch.equal(y, ref.rms_norm(x, g, 1e-6))
    y2, _, h = npu.npu_add_rms_norm(x, r, g, epsilon=1e-6)
    assert torch.equal(h, x + r) and torch.equal(y2, ref.rms_norm(x + r, g, 1e-6))   # x1 + x2 rounded first
    with pytest.raises(EmulationError, match="gamma dtype"):
        npu.npu_rms_norm(x, g.float())


# --- npu_moe_gating_top_k -------------------------------------------------------------------------
def _logit(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64)).float()


def test_gating_groups_by_top2_sum_choose_by_bias_weigh_unbiased():
    # 12 experts in 3 groups of 4; sigmoid scores chosen by hand
    s = [[0.9, 0.1, 0.1, 0.1,    # group 0: max 0.9, top-2 sum 1.0
          0.6, 0.6, 0.1, 0.1,    # group 1: max 0.6, top-2 sum 1.2
          0.5, 0.2, 0.2, 0.2]]   # group 2
    x = _logit(s)
    y, idx, _ = npu.npu_moe_gating_top_k(x, 2, bias=torch.zeros(12), k_group=1, group_count=3, group_select_mode=1,
                                         norm_type=1, routed_scaling_factor=1.0)
    assert sorted(idx[0].tolist()) == [4, 5]                       # top-2 sum picks group 1
    y0, idx0, _ = npu.npu_moe_gating_top_k(x, 2, bias=torch.zeros(12), k_group=1, group_count=3, group_select_mode=0,
                                           norm_type=1)
    assert idx0[0, 0].item() == 0                                  # max picks group 0
    # the bias steers the choice, the weights stay the unbiased sigmoid, renormalised and scaled
    bias = torch.zeros(12)
    bias[6] = 0.7                                                  # 0.1 + 0.7 beats 0.6
    y, idx, norm = npu.npu_moe_gating_top_k(x, 2, bias=bias, k_group=1, group_count=3, group_select_mode=1,
                                            norm_type=1, out_flag=True, routed_scaling_factor=2.5)
    assert idx[0].tolist() == [6, 4] and idx.dtype == torch.int32
    assert y[0].tolist() == pytest.approx([0.1 / 0.7 * 2.5, 0.6 / 0.7 * 2.5], rel=1e-5)
    assert norm.dtype == torch.float32 and torch.allclose(norm, torch.tensor(s))


def test_gating_ties_go_to_the_lower_index_and_softmax_mode():
    x = torch.zeros(1, 8)                                          # all equal
    _, idx, _ = npu.npu_moe_gating_top_k(x, 3, bias=torch.zeros(8), group_count=1, norm_type=1)
    assert idx[0].tolist() == [0, 1, 2]
    y, _, _ = npu.npu_moe_gating_top_k(torch.randn(3, 8), 2, group_count=1, norm_type=0)
    assert not torch.allclose(y.sum(-1), torch.ones(3))            # softmax with renorm 0: not renormalised


def test_gating_matches_deepseek_noaux_tc_at_v3_shape():
    g = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(64, 256, generator=g), 0.1 * torch.randn(256, generator=g)
    spec = GateSpec(8, 8, 4, True, 2.5)
    y, idx, _ = npu.npu_moe_gating_top_k(logits, 8, bias=bias, k_group=4, group_count=8, group_select_mode=1,
                                         norm_type=1, routed_scaling_factor=2.5)
    # the reference gate on an identity projection sees the same logits
    w_ref, ids_ref = ref.moe_gate(logits, torch.eye(256), bias, spec)
    order, order_ref = idx.long().sort(-1), ids_ref.sort(-1)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(y.gather(1, order.indices), w_ref.gather(1, order_ref.indices), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_count=4), "experts per group"),                    # 8 / 4 = 2 is not > 2
    (dict(group_count=3), "divide"),
    (dict(group_count=2, k_group=3), "k_group"),
    (dict(group_count=1, renorm=1), "renorm"),
])
def test_gating_constraints(kwargs, match):
    with pytest.raises(EmulationError, match=match):
        npu.npu_moe_gating_top_k(torch.randn(2, 8), 2, norm_type=1, **kwargs)


# --- npu_moe_init_routing_v2 ----------------------------------------------------------------------
def test_init_routing_sorts_slots_by_expert_stably():
    x = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)
    idx = torch.tensor([[2, 0], [1, 2], [0, 1]], dtype=torch.int32)           # slots p = n*K + j
    ex, rows, count, _ = npu.npu_moe_init_routing_v2(
        x, idx, active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1, active_expert_range=[0, 3], row_idx_type=0)
    # sorted slots by expert: e0: p1, p4; e1: p2, p5; e2: p0, p3
    assert rows.tolist() == [4, 0, 2, 5, 1, 3] and rows.dtype == torch.int32
    assert count.tolist() == [2, 2, 2] and count.dtype == torch.int64
    assert torch.equal(ex, x[[0, 2, 1, 2, 0, 1]])                               # x[sorted // K]
    _, scatter, _, _ = npu.npu_moe_init_routing_v2(
        x, idx, active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1, active_expert_range=[0, 3], row_idx_type=1)
    assert scatter.tolist() == [1, 4, 2, 5, 0, 3]


def test_init_routing_active_range_and_dynamic_quant():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    idx = torch.tensor([[2, 0], [1, 3], [0, 1]], dtype=torch.int32)
    ex, rows, count, scale = npu.npu_moe_init_routing_v2(
        x, idx, active_num=6, expert_num=4, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=1, active_expert_range=[1, 3], row_idx_type=0)
    assert count.tolist() == [2, 1]                                  # experts 1, 2 only
    assert rows.tolist() == [2, -1, 0, -1, -1, 1]                    # slots of experts 0 and 3: -1
    assert ex.dtype == torch.int8 and ex.shape == (6, 16)
    q, s = npu.npu_dynamic_quant(x[[1, 2, 0]])                       # same per-row int8 rule
    assert torch.equal(ex[:3], q) and torch.allclose(scale[:3], s)
    assert scale[3:].isnan().all()                                   # rows past the valid count: undefined


# --- npu_grouped_matmul ---------------------------------------------------------------------------
def test_grouped_matmul_float_and_pertoken_int8():
    g = torch.Generator().manual_seed(2)
    e, k, n = 3, 16, 8
    counts = torch.tensor([2, 0, 3])
    w = torch.randn(e, n, k, generator=g).to(torch.bfloat16)        # stored [E, N, K]; passed as a view
    x = torch.randn(5, k, generator=g).to(torch.bfloat16)
    (y,) = npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=counts, split_item=2, group_type=0,
                                  group_list_type=1)
    expected = torch.cat([x[:2].float() @ w[0].float().T, x[2:].float() @ w[2].float().T]).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    (y_cum,) = npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=counts.cumsum(0), split_item=3,
                                      group_type=0, group_list_type=0)
    assert torch.equal(y_cum, y)
    xq, ws = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g), torch.rand(e, n) + 0.5
    wq, tok = torch.randint(-128, 128, (e, n, k), dtype=torch.int8, generator=g), torch.rand(5) + 0.5
    (yq,) = npu.npu_grouped_matmul([xq], [wq.transpose(1, 2)], scale=[ws.to(torch.bfloat16)], per_token_scale=[tok],
                                   group_list=counts, split_item=2, group_type=0, group_list_type=1,
                                   output_dtype=torch.bfloat16)
    first = (xq[:2].long() @ wq[0].long().T).float() * ws[0].to(torch.bfloat16).float() * tok[:2, None]
    assert torch.equal(yq[:2], first.to(torch.bfloat16))
    with pytest.raises(EmulationError, match="covers 4 rows"):
        npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=torch.tensor([2, 0, 2]), split_item=2,
                               group_type=0, group_list_type=1)


# --- npu_fused_infer_attention_score --------------------------------------------------------------
def _paged_case(heads=32, block=128, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(5, block, 576, generator=g).to(dtype)
    table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32)
    lens = [block + 7, 3]
    ql, qr = torch.randn(2, heads, 512, generator=g).to(dtype), torch.randn(2, heads, 64, generator=g).to(dtype)
    return cache, table, lens, ql, qr


def test_fia_mla_decode_matches_latent_attention():
    cache, table, lens, ql, qr = _paged_case()
    latent, rope = cache[..., :512].contiguous(), cache[..., 512:].contiguous()
    out, lse = npu.npu_fused_infer_attention_score(
        ql.unsqueeze(2), latent, latent, query_rope=qr.unsqueeze(2), key_rope=rope, num_heads=32,
        num_key_value_heads=1, input_layout="BNSD", scale=0.1, block_table=table, block_size=128,
        actual_seq_lengths_kv=lens)
    expected = ref.mla_decode(ql, qr, cache, table, torch.tensor(lens, dtype=torch.int32), 0.1)
    assert out.shape == (2, 32, 1, 512) and torch.equal(out.squeeze(2), expected)
    assert lse.shape == (1,) and lse.item() == 0                     # softmax_lse_flag False
    with pytest.raises(EmulationError, match="contiguous"):          # the layout our cache would give
        npu.npu_fused_infer_attention_score(
            ql.unsqueeze(2), cache[..., :512], cache[..., :512], query_rope=qr.unsqueeze(2), key_rope=cache[..., 512:],
            num_heads=32, num_key_value_heads=1, input_layout="BNSD", scale=0.1, block_table=table, block_size=128,
            actual_seq_lengths_kv=lens)
    cache, table, lens, ql, qr = _paged_case(heads=4)
    latent, rope = cache[..., :512].contiguous(), cache[..., 512:].contiguous()
    with pytest.raises(EmulationError, match="32, 64 or 128"):
        npu.npu_fused_infer_attention_score(
            ql.unsqueeze(2), latent, latent, query_rope=qr.unsqueeze(2), key_rope=rope, num_heads=4,
            num_key_value_heads=1, input_layout="BNSD", scale=0.1, block_table=table, block_size=128,
            actual_seq_lengths_kv=lens)


def test_fia_tnd_prefill_right_down_causal():
    g = torch.Generator().manual_seed(4)
    q_lens, k_lens = [5, 2], [5, 6]
    q = torch.randn(7, 4, 192, generator=g).to(torch.bfloat16)
    k = torch.randn(11, 4, 192, generator=g).to(torch.bfloat16)
    v = torch.randn(11, 4, 128, generator=g).to(torch.bfloat16)
    mask = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    out, _ = npu.npu_fused_infer_attention_score(
        q, k, v, atten_mask=mask, actual_seq_lengths=[5, 7], actual_seq_lengths_kv=[5, 11], num_heads=4,
        num_key_value_heads=4, input_layout="TND", scale=0.08, sparse_mode=3)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    assert torch.equal(out, ref.mla_prefill(q, k, v, cu(q_lens), cu(k_lens), 0.08))
    with pytest.raises(EmulationError, match="triu"):
        npu.npu_fused_infer_attention_score(
            q, k, v, atten_mask=mask.T.contiguous(), actual_seq_lengths=[5, 7], actual_seq_lengths_kv=[5, 11],
            num_heads=4, num_key_value_heads=4, input_layout="TND", scale=0.08, sparse_mode=3)
    with pytest.raises(EmulationError, match="bfloat16"):
        npu.npu_fused_infer_attention_score(
            q.half(), k.half(), v.half(), atten_mask=mask, actual_seq_lengths=[5, 7], actual_seq_lengths_kv=[5, 11],
            num_heads=4, num_key_value_heads=4, input_layout="TND", scale=0.08, sparse_mode=3)
