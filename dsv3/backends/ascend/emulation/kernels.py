"""EMULATED torch_npu kernels: plain-torch implementations of documented torch_npu semantics, on CPU.

Sources (the docs each function follows; `OP_PLUGIN` is the Ascend/op-plugin repository's API docs,
which the hiascend.com torch_npu API pages are built from):
  OP_PLUGIN = https://github.com/Ascend/op-plugin/blob/master/docs/context/
  CANN goldens (the reference math Huawei tests its kernels against):
    https://github.com/hicann/ops-nn/blob/master/quant/dynamic_quant/tests/assets/golden.py
    https://github.com/hicann/ops-transformer/blob/master/moe/moe_gating_top_k/tests/assets/golden.py
    https://github.com/hicann/ops-transformer/blob/master/moe/moe_init_routing_v3/tests/assets/golden.py
Signatures: torch_npu 2.13.0 wheel, torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml.
"""
from __future__ import annotations

import functools

import torch

__dsv3_emulation__ = True   # the ascend plugin checks this flag; the real torch_npu has no such attribute
__version__ = "2.13.0+dsv3-emulation"

CALL_LOG: list[tuple[str, int, tuple[str, ...]]] = []   # (op, positional count, keyword names) per call


class EmulationError(RuntimeError):
    """A call outside what the torch_npu documentation allows (the NPU would reject it too)."""


def _require(cond: bool, op: str, why: str) -> None:
    if not cond:
        raise EmulationError(f"torch_npu.{op} (emulated): {why}")


def _logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALL_LOG.append((fn.__name__, len(args), tuple(sorted(kwargs))))
        return fn(*args, **kwargs)
    return wrapper


def _undefined_like(t: torch.Tensor) -> torch.Tensor:
    """Storage the docs call undefined: NaN for floats so a reader fails loudly, zeros otherwise."""
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.zeros_like(t)


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 @ int8 with the exact int32 result the NPU accumulates. Computed in float64 (BLAS-fast on
    CPU): every product is <= 2^14 and K <= 65535, so each sum is an integer below 2^31 < 2^53, exact."""
    return (a.double() @ b.double()).to(torch.int32)


_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


# --- quantisation ---------------------------------------------------------------------------------
@_logged
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """OP_PLUGIN torch_npu-npu_dynamic_quant.md: per-token symmetric int8.
    scale = rowMax(|x|) / 127 (float32, shape x.shape[:-1]); y = round(x / scale) in int8.
    Rounding half to even and the all-zero-row guard (scale 0 -> 1) follow the aclnn golden."""
    op = "npu_dynamic_quant"
    _require(input.dtype in _HALF, op, f"x must be float16 or bfloat16, got {input.dtype}")
    _require(input.dim() > 1, op, "x must have more than one dimension")
    if smooth_scales is not None or group_index is not None or quant_mode != "pertoken" or \
            dst_type not in (None, torch.int8):
        raise NotImplementedError(f"{op}: only the plain per-token int8 mode is emulated")
    x = input.float()
    scale = x.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = torch.round(x / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, scale


@_logged
def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    """OP_PLUGIN torch_npu-npu_quant_matmul.md: out = (x1 @ x2) * scale * pertoken_scale (+ bias).
    x1 int8 [m, k], x2 int8 [k, n] (a transposed [n, k] view is allowed: the doc's example passes
    x2.t()); the product accumulates exactly in int32. Emulated rows of the doc's dtype table (Atlas
    A2/A3): scale float32|bfloat16 + pertoken float32 -> bfloat16; scale float32 + pertoken float32
    -> float16."""
    op = "npu_quant_matmul"
    _require(x1.dtype == torch.int8 and x2.dtype == torch.int8, op, "only int8 x1/x2 are emulated")
    _require(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, "x1 and x2 must have 2 to 6 dimensions")
    _require(x1.shape[-1] == x2.shape[-2], op, f"k mismatch: x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}")
    _require(x1.shape[-1] <= 65535 and x2.shape[-1] <= 65535, op, "last dims of x1 and x2 must be <= 65535")
    n = x2.shape[-1]
    _require(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale must be 1-D of size 1 or n={n}")
    if offset is not None or group_sizes is not None or y_scale is not None or any(
            d is not None for d in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype)):
        raise NotImplementedError(f"{op}: offset / group_sizes / explicit dtypes are not emulated")
    _require(pertoken_scale is not None, op, "only the per-token (pertoken_scale) mode is emulated")
    _require(pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == x1.shape[:-1], op,
             f"pertoken_scale must be float32 of shape (m,) = {tuple(x1.shape[:-1])}")
    if output_dtype == torch.bfloat16:
        _require(scale.dtype in (torch.float32, torch.bfloat16), op, "bfloat16 output needs float32/bfloat16 scale")
    elif output_dtype == torch.float16:
        _require(scale.dtype == torch.float32, op, "float16 output with pertoken_scale needs a float32 scale")
    else:
        raise EmulationError(f"{op}: with pertoken_scale the output dtype must be bfloat16 or float16, "
                             f"got {output_dtype}")
    acc = _int_matmul(x1, x2)                                           # exact int32 accumulation
    out = acc.float() * scale.float() * pertoken_scale.float().unsqueeze(-1)
    if bias is not None:
        _require(bias.dim() == 1 and bias.shape[0] == n and bias.dtype in _FLOAT, op,
                 "only a float bias of shape (n,) is emulated (added after scaling)")
        out = out + bias.float()
    return out.to(output_dtype)


# --- normalisation --------------------------------------------------------------------------------
def _rms(op, x, gamma, epsilon):
    _require(x.dtype in _FLOAT, op, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _require(gamma.dtype == x.dtype, op, f"gamma dtype {gamma.dtype} must equal x dtype {x.dtype}")
    _require(tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape), op,
             "gamma must match the trailing dims of x")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)   # float32, as the doc's rstd
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


@_logged
def npu_rms_norm(self, gamma, epsilon=1e-06):
    """https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
    y = x / sqrt(mean(x^2) + eps) * gamma, computed in float32; returns (y in x's dtype, rstd float32)."""
    return _rms("npu_rms_norm", self, gamma, epsilon)


@_logged
def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """Schema in the torch_npu 2.13.0 wheel; math from Ascend/op-plugin
    test/test_custom_ops/test_npu_add_rms_norm.py (its CPU golden): x = x1 + x2 in the input dtype,
    then rms_norm(x). Returns (y, rstd, x)."""
    op = "npu_add_rms_norm"
    _require(x1.shape == x2.shape and x1.dtype == x2.dtype, op, "x1 and x2 must have the same shape and dtype")
    x = (x1.float() + x2.float()).to(x1.dtype)
    y, rstd = _rms(op, x, gamma, epsilon)
    return y, rstd, x


# --- MoE routing ----------------------------------------------------------------------------------
@_logged
def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """OP_PLUGIN torch_npu-npu_moe_gating_top_k.md (+ aclnnMoeGatingTopK_en.md and its golden):
      normOut = sigmoid(x) (norm_type 1) | softmax(x) (norm_type 0), in float32
      value   = normOut + bias                      (bias only steers the choice)
      group score = max (mode 0) | sum of top-2 (mode 1) of `value` per group; keep the k_group best
      groups (stable descending sort: ties go to the lower index), mask the rest with -inf
      expertIdx = top-k of the masked `value` (stable descending sort)
      y = normOut[expertIdx]  (UNBIASED); y /= sum(y) + eps when norm_type 1 (or renorm 1); y *= rsf.
    Returns (y in x's dtype [T, k], expertIdx int32 [T, k], normOut float32 [T, E] if out_flag)."""
    op = "npu_moe_gating_top_k"
    _require(x.dim() == 2 and x.dtype in _FLOAT, op, "x must be a 2-D float16/bfloat16/float32 tensor")
    t, e = x.shape
    if input_ids is not None or tid2eid is not None:
        raise NotImplementedError(f"{op}: hash routing (input_ids/tid2eid) is not emulated")
    _require(e <= 2048, op, f"expert count {e} must be <= 2048")
    _require(group_count > 0 and e % group_count == 0, op, f"{e} experts must divide into group_count={group_count}")
    per_group = e // group_count
    # torch_npu doc: E / group_count > 2 (the aclnn doc says > group_select_mode; we keep the stricter)
    _require(per_group > 2, op, f"experts per group ({per_group}) must be > 2")
    _require(-(-per_group // 32) * 32 * group_count <= 2048, op, "32-aligned experts per group * group_count > 2048")
    _require(1 <= k_group <= group_count, op, f"k_group={k_group} must be in [1, group_count={group_count}]")
    _require(1 <= k <= per_group * k_group, op, f"k={k} must be in [1, E / group_count * k_group]")
    _require(group_select_mode in (0, 1), op, "group_select_mode must be 0 or 1")
    _require(norm_type in (0, 1), op, "norm_type must be 0 (softmax) or 1 (sigmoid)")
    _require(renorm == 0, op, "renorm supports only 0 (norm before top-k)")
    if bias is not None:
        _require(bias.shape == (e,) and bias.dtype == x.dtype, op, "bias must be 1-D [E] with x's dtype")

    norm = x.float().sigmoid() if norm_type == 1 else x.float().softmax(dim=-1)     # [T, E]
    value = norm if bias is None else norm + bias.float()
    if group_count > 1:
        grouped = value.view(t, group_count, per_group)
        score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k_group]
        masked = torch.ones(t, group_count, dtype=torch.bool).scatter_(1, keep, False)
        value = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).view(t, e)
    idx = torch.sort(value, dim=-1, descending=True, stable=True).indices[:, :k]    # [T, k]
    y = norm.gather(1, idx)
    if norm_type == 1 or renorm == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    norm_out = norm if out_flag else torch.full_like(norm, float("nan"))
    return y.to(x.dtype), idx.to(torch.int32), norm_out


@_logged
def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0, x_dtype=None):  # noqa: B006 - schema default
    """OP_PLUGIN torch_npu-npu_moe_init_routing_v2.md, formulas in aclnnMoeInitRoutingV3_en.md, golden
    moe_init_routing_v3/tests/assets/golden.py. x [N, H], expert_idx int32 [N, K]; slot p = n*K + j.
      sorted = stable argsort of expert_idx.flatten() (experts < start pushed to the end)
      valid slots: start <= expert < end (active_expert_range); n_valid of them, first in `sorted`
      expanded_x[i] = x[sorted[i] // K] for i < n_valid (int8 with a per-row scale when quant_mode 1:
        scale = rowmax|x| / 127, q = round(x / scale)); rows >= n_valid are undefined
      expanded_row_idx: row_idx_type 0 (gather): [p] = row of slot p in expanded_x, -1 if not valid;
        row_idx_type 1 (scatter): = sorted
      expert_token_count (expert_tokens_num_type 1): tokens per expert in [start, end), int64
      expanded_scale [N*K] float32: the quant scales (quant_mode 1); undefined when not quantising."""
    op = "npu_moe_init_routing_v2"
    _require(x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op,
             "x must be [N, H] and expert_idx [N, K]")
    _require(expert_idx.dtype == torch.int32, op, "expert_idx must be int32")
    n, k = expert_idx.shape
    if offset is not None or scale is not None or x_dtype is not None:
        raise NotImplementedError(f"{op}: scale / offset / x_dtype are not emulated")
    _require(active_num == n * k, op, f"active_num is checked to equal NUM_ROWS*K = {n * k}")
    _require(drop_pad_mode == 0, op, "drop_pad_mode supports only 0 (dropless)")
    _require(expert_tokens_num_type == 1, op, "only expert_tokens_num_type 1 (count) is emulated")
    _require(expert_tokens_num_flag, op, "expert_tokens_num_flag supports only True")
    _require(quant_mode in (-1, 1), op, "quant_mode supports -1 (none) and 1 (dynamic int8)")
    _require(row_idx_type in (0, 1), op, "row_idx_type must be 0 or 1")
    _require(0 <= expert_num <= 10240, op, "expert_num must be in [0, 10240]")
    start, end = active_expert_range if len(active_expert_range) else (0, expert_num)
    _require(0 <= start < end <= expert_num, op, f"active_expert_range {[start, end]} must lie in [0, expert_num]")
    flat = expert_idx.flatten().long()
    _require(bool(((flat >= 0) & (flat < expert_num)).all()), op, "expert ids must lie in [0, expert_num)")

    valid = (flat >= start) & (flat < end)
    n_valid = int(valid.sum())
    key = torch.where(flat < start, torch.iinfo(torch.int32).max, flat)
    order = torch.sort(key, stable=True).indices                               # [N*K]
    if row_idx_type == 0:
        row_idx = torch.full((n * k,), -1, dtype=torch.int32)
        row_idx[order[:n_valid]] = torch.arange(n_valid, dtype=torch.int32)
    else:
        row_idx = order.to(torch.int32)
    rows = x[order[:n_valid] // k]                                             # [n_valid, H]
    expanded_scale = torch.full((n * k,), float("nan"))
    if quant_mode == 1:
        rf = rows.float()
        s = rf.abs().amax(-1) / 127.0
        # an all-zero row divides 0 by 0 in the golden; we return q = 0 with scale 0 (dequantises to 0)
        q = torch.where(s.unsqueeze(-1) > 0, torch.round(rf / s.clamp_min(1e-30).unsqueeze(-1)), 0.0)
        expanded_x = torch.zeros(n * k, x.shape[1], dtype=torch.int8)
        expanded_x[:n_valid] = q.clamp(-128, 127).to(torch.int8)
        expanded_scale[:n_valid] = s
    else:
        expanded_x = torch.full((n * k, x.shape[1]), float("nan"), dtype=x.dtype) if x.is_floating_point() \
            else torch.zeros(n * k, x.shape[1], dtype=x.dtype)
        expanded_x[:n_valid] = rows
    count = torch.bincount(flat[valid] - start, minlength=end - start).to(torch.int64)
    return expanded_x, row_idx, count, expanded_scale


@_logged
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """OP_PLUGIN torch_npu-npu_grouped_matmul.md, the single-x/single-weight/single-y scenario
    (group_type 0, split_item 2|3, group_list a Tensor): x [M, K], weight [E, K, N] (a transposed
    [E, N, K] view is allowed), rows of x split into E consecutive groups by group_list (cumsum for
    group_list_type 0, counts for 1), y_i = x_i @ weight_i, returned as [y] with y [M, N].
      non-quantised: x, weight float16|bfloat16|float32 of one dtype, output that dtype;
      per-token int8 (formula 3): y_i = (x_i @ w_i) * scale_i * per_token_scale_i with int32 sums;
        scale [E, N] bfloat16 -> bfloat16 out, float32 -> float16 out; per_token_scale float32 [M].
    Rows past the total of group_list are not computed (undefined, NaN here)."""
    op = "npu_grouped_matmul"
    _require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), op, "x and weight are lists")
    _require(len(x) == 1 and len(weight) == 1, op, "only the single-x single-weight scenario is emulated")
    if bias is not None or offset is not None or antiquant_scale is not None or antiquant_offset is not None or \
            activation_input is not None or activation_quant_scale is not None or activation_quant_offset is not None \
            or act_type != 0 or tuning_config is not None or any(
                d is not None for d in (x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)):
        raise NotImplementedError(f"{op}: bias/offset/antiquant/activation/tuning/explicit dtypes are not emulated")
    a, w = x[0], weight[0]
    _require(group_type == 0 and split_item in (2, 3), op, "single-tensor mode needs group_type 0, split_item 2|3")
    _require(a.dim() == 2 and w.dim() == 3 and a.shape[1] == w.shape[1], op,
             f"x must be [M, K] and weight [E, K, N]; got {tuple(a.shape)}, {tuple(w.shape)}")
    _require(a.is_contiguous(), op, "x must not be transposed (contiguous)")
    e, kdim, n = w.shape
    _require(kdim < 65536 and n < 65536, op, "inner dims must be < 65536")
    _require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.shape == (e,),
             op, f"group_list must be an int64 tensor of length E={e}")
    _require(e <= 1024, op, "at most 1024 groups")
    _require(group_list_type in (0, 1), op, "only group_list_type 0 (cumsum) and 1 (counts) are emulated")
    _require(bool((group_list >= 0).all()), op, "group_list must be non-negative")
    ends = group_list if group_list_type == 0 else group_list.cumsum(0)
    if group_list_type == 0:
        _require(bool((ends[1:] >= ends[:-1]).all()), op, "cumsum group_list must be non-decreasing")
    # the doc asks the groups to cover x exactly (last cumsum / total count == M)
    _require(int(ends[-1]) == a.shape[0], op, f"group_list covers {int(ends[-1])} rows, x has {a.shape[0]}")
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))

    quantised = a.dtype == torch.int8
    if quantised:
        _require(w.dtype == torch.int8, op, "int8 x needs int8 weight")
        _require(scale is not None and len(scale) == 1 and scale[0].shape == (e, n), op, "scale must be [[E, N]]")
        _require(per_token_scale is not None and len(per_token_scale) == 1 and
                 per_token_scale[0].dtype == torch.float32 and per_token_scale[0].shape == (a.shape[0],), op,
                 "per_token_scale must be [float32 [M]]")
        allowed = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}
        _require(allowed.get(scale[0].dtype) == output_dtype, op,
                 "per-token int8: scale bfloat16 -> output bfloat16, scale float32 -> output float16")
        out_dtype = output_dtype
    else:
        _require(a.dtype in _FLOAT and w.dtype == a.dtype, op, "non-quantised x and weight must share a float dtype")
        _require(scale is None and per_token_scale is None, op, "non-quantised mode takes no scales")
        _require(output_dtype in (None, a.dtype), op, "non-quantised output dtype must be x's")
        out_dtype = a.dtype
    y = torch.full((a.shape[0], n), float("nan"), dtype=out_dtype)
    for g, (s0, s1) in enumerate(zip(starts.tolist(), ends.tolist())):
        if s1 == s0:
            continue
        if quantised:
            acc = _int_matmul(a[s0:s1], w[g])                                     # exact int32 sums
            yg = acc.float() * scale[0][g].float() * per_token_scale[0][s0:s1].unsqueeze(-1)
        else:
            yg = a[s0:s1].float() @ w[g].float()
        y[s0:s1] = yg.to(out_dtype)
    return [y]


# --- attention ------------------------------------------------------------------------------------
@_logged
def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
                                    dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None,
                                    query_padding_size=None, kv_padding_size=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """OP_PLUGIN torch_npu-npu_fused_infer_attention_score.md: softmax(scale * q k^T + mask) v.
    Two of its modes are emulated, the two the ascend backend uses:
      MLA paged decode: query [B, N, 1, 512] (BNSD), query_rope [B, N, 1, 64], key = value
        [blocks, block_size, 512], key_rope [blocks, block_size, 64], block_table int32 [B, max_blocks],
        actual_seq_lengths_kv (per batch); score = q.k + q_rope.k_rope. Doc constraints: N in
        {32, 64, 128}, key N = 1, block_size in {16, 128}, sparse_mode 0 without mask, no lse.
      TND ragged prefill without rope: query [T, N, 192], key [Tk, N, 192], value [Tk, N, 128|192],
        bfloat16 only, actual_seq_lengths / actual_seq_lengths_kv cumulative; sparse_mode 3
        (rightDownCausal: query i of a batch sees keys j <= i + kv_len - q_len) with the optimised
        2048x2048 mask, or sparse_mode 0 without a mask (no masking).
    Returns (attention_out with value's D, softmax_lse = zeros [1])."""
    op = "npu_fused_infer_attention_score"
    unused = (pse_shift, dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2, antiquant_scale,
              antiquant_offset, key_antiquant_scale, key_antiquant_offset, value_antiquant_scale,
              value_antiquant_offset, query_padding_size, kv_padding_size, key_shared_prefix, value_shared_prefix,
              actual_shared_prefix_len, key_rope_antiquant_scale)
    if any(u is not None for u in unused) or softmax_lse_flag or antiquant_mode or key_antiquant_mode or \
            value_antiquant_mode:
        raise NotImplementedError(f"{op}: quantisation, pse, padding, prefix and lse are not emulated")
    for name, t in (("query", query), ("key", key), ("value", value), ("query_rope", query_rope),
                    ("key_rope", key_rope)):
        _require(t is None or t.is_contiguous(), op, f"{name} must be contiguous (non-contiguous is unsupported)")
    lse = torch.zeros(1)
    if query_rope is not None or key_rope is not None:
        return _mla_paged_decode(op, query, key, value, query_rope, key_rope, block_table, actual_seq_lengths_kv,
                                 num_heads, scale, input_layout, num_key_value_heads, sparse_mode, atten_mask,
                                 block_size), lse
    return _tnd_prefill(op, query, key, value, atten_mask, actual_seq_lengths, actual_seq_lengths_kv, num_heads,
                        scale, input_layout, num_key_value_heads, sparse_mode, block_table), lse


def _mla_paged_decode(op, q, key, value, q_rope, k_rope, block_table, kv_lens, num_heads, scale, layout,
                      num_kv_heads, sparse_mode, mask, block_size):
    _require(q_rope is not None and k_rope is not None, op, "query_rope and key_rope must be given together")
    _require(layout == "BNSD", op, "only input_layout BNSD is emulated for MLA")
    _require(q.dtype in _HALF and q_rope.dtype == q.dtype and key.dtype == q.dtype and k_rope.dtype == key.dtype,
             op, "MLA inputs must be float16/bfloat16 of one dtype")
    b, n, s, d = q.shape
    _require(d == 512, op, f"MLA query D must be 512 (got {d})")
    _require(s == 1, op, "only Q_S = 1 is emulated (the doc allows 1-16 with sparse_mode 3)")
    _require(n == num_heads and n in (32, 64, 128), op, f"query N must be 32, 64 or 128 and equal num_heads ({n})")
    _require(q_rope.shape == (b, n, s, 64), op, "query_rope must be the query shape with D = 64")
    _require(num_kv_heads == 1, op, "MLA needs num_key_value_heads = 1")
    _require(key.shape == value.shape and key.dim() == 3 and key.shape[-1] == 512, op,
             "key/value must be [blocks, block_size, 512] (H = 1 * 512)")
    _require(k_rope.shape == key.shape[:-1] + (64,), op, "key_rope must be the key shape with D = 64")
    _require(block_size in (16, 128) and key.shape[1] == block_size, op, "MLA page attention needs block_size 16|128")
    _require(sparse_mode == 0 and mask is None, op, "Q_S = 1 MLA supports only sparse_mode 0 without a mask")
    _require(block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2 and
             block_table.shape[0] == b, op, "block_table must be int32 [B, max_blocks]")
    _require(kv_lens is not None and len(kv_lens) == b, op, "page attention needs actual_seq_lengths_kv per batch")
    out = torch.empty(b, n, s, d, dtype=q.dtype)
    for i, length in enumerate(kv_lens):
        nblk = -(-length // block_size)
        _require(nblk <= block_table.shape[1], op, "block_table narrower than the sequence")
        blocks = block_table[i, :nblk].long()
        kv = key[blocks].reshape(-1, d)[:length].float()                       # [L, 512]
        kr = k_rope[blocks].reshape(-1, 64)[:length].float()                   # [L, 64]
        v = value[blocks].reshape(-1, d)[:length].float()
        scores = (q[i, :, 0].float() @ kv.T + q_rope[i, :, 0].float() @ kr.T) * scale   # [N, L]
        out[i, :, 0] = (scores.softmax(-1) @ v).to(q.dtype)
    return out


def _tnd_prefill(op, q, k, v, mask, q_cum, kv_cum, num_heads, scale, layout, num_kv_heads, sparse_mode, block_table):
    _require(layout == "TND", op, "only input_layout TND is emulated without rope")
    _require(q.dtype == torch.bfloat16 and k.dtype == q.dtype and v.dtype == q.dtype, op,
             "TND with D != 512 supports bfloat16 only")
    t, n, dq = q.shape
    _require(k.dim() == 3 and v.dim() == 3 and k.shape[0] == v.shape[0], op, "key/value must be [Tk, N, D]")
    _require((dq, k.shape[2]) == (192, 192) and v.shape[2] in (128, 192) or
             (dq, k.shape[2], v.shape[2]) == (128, 128, 128), op,
             "TND without rope needs Q_D = K_D = 192 with V_D 128|192, or all D = 128")
    _require(n == num_heads and k.shape[1] == n and v.shape[1] == n and num_kv_heads in (0, n), op,
             "Q_N, K_N and V_N must be equal")
    _require(n in (2, 4, 8, 16, 32, 64, 128), op, f"N must be one of 2..128 (powers of two), got {n}")
    _require(block_table is None, op, "page attention is not supported in this mode")
    _require(t <= 1 << 20, op, "T must be <= 1M")
    _require(q_cum is not None and kv_cum is not None and len(q_cum) == len(kv_cum) <= 4096, op,
             "TND needs actual_seq_lengths and actual_seq_lengths_kv of equal length (<= 4096)")
    _require(q_cum[-1] == t and kv_cum[-1] == k.shape[0], op, "cumulative lengths must end at T and Tk")
    if sparse_mode == 3:
        _require(mask is not None and tuple(mask.shape[-2:]) == (2048, 2048) and
                 mask.dtype in (torch.bool, torch.int8, torch.uint8), op,
                 "sparse_mode 3 needs the optimised 2048x2048 mask")
        _require(bool(torch.equal(mask.reshape(2048, 2048).bool(),
                                  torch.ones(2048, 2048, dtype=torch.bool).triu(1))), op,
                 "the optimised rightDownCausal mask is triu(ones(2048, 2048), 1) (1 = masked)")
    else:
        _require(sparse_mode == 0 and mask is None, op, "only sparse_mode 3 with mask or 0 without are emulated")
    out = torch.empty(t, n, v.shape[2], dtype=q.dtype)
    q0 = k0 = 0
    for q1, k1 in zip(q_cum, kv_cum):
        lq, lk = q1 - q0, k1 - k0
        # The doc writes "actualSeqLengths < actualSeqLengthsKv" per batch for sparse 3; we accept
        # lq <= lk (a fresh prompt has lq == lk), an interpretation only hardware can confirm.
        _require(lq <= lk, op, "each batch needs q_len <= kv_len")
        qb, kb, vb = (x.float().transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))   # [N, L, D]
        scores = (qb @ kb.transpose(1, 2)) * scale                                           # [N, lq, lk]
        if sparse_mode == 3:
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
        q0, k0 = q1, k1
    return out


__all__ = ["npu_dynamic_quant", "npu_quant_matmul", "npu_rms_norm", "npu_add_rms_norm", "npu_moe_gating_top_k",
           "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_fused_infer_attention_score", "EmulationError",
           "CALL_LOG", "__dsv3_emulation__"]
