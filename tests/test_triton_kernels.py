"""Every Triton kernel under TRITON_INTERPRET=1 at small shapes, against the reference ops.

Inputs are fresh random data each run (never zeros). Tolerances, and why:
- fp8 loads and fp8 tl.dot are exact in the interpreter, so GEMMs on pre-quantised inputs match
  float64 math to fp32 rounding (rel 1e-5).
- the interpreter's fp32->fp8 cast is wrong when rounding carries into the exponent (the value
  comes out halved, ~2% of random values), sometimes on subnormals, and rarely elsewhere (a
  neighbouring code); the GPU cast is right. Kernels that quantise inside are therefore compared
  with the same quantisation done by our own act_quant kernel (which shares the cast), and
  act_quant itself is checked for exact scales and <5% of codes at exactly half.
- inputs are float32: bf16 arithmetic in the interpreter is wrong, and kernels compute in fp32.
"""
import importlib
import os

import pytest
import torch

from dsv3.backends.reference import ops as ref
from dsv3.core.ops import ExpertWeights, GateSpec
from dsv3.core.quant import FP8_MAX, quantize_act_fp8, quantize_fp8_block
from dsv3.core.weights import QuantWeight, dequantize

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests: run without a GPU or with TRITON_INTERPRET=1 (tests/conftest.py)")


def interpreted(module: str):
    """dsv3.backends.triton.<module>; tests/conftest.py set TRITON_INTERPRET=1 before triton was imported."""
    return importlib.import_module(f"dsv3.backends.triton.{module}")


@pytest.fixture(scope="module")
def k():
    class K:
        quant = interpreted("quant")
        gemm = interpreted("gemm")
        tuning = interpreted("tuning")
        norm = interpreted("norm")
        elementwise = interpreted("elementwise")
        mla = interpreted("mla")
        gate = interpreted("gate")
        counters = interpreted("counters")
        moe = interpreted("moe")
        ops = interpreted("ops")
    return K


def target(k, fp8=torch.float8_e4m3fn):
    return k.tuning.Target("gfx942" if fp8 == torch.float8_e4m3fnuz else "cuda", fp8, num_sms=8)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_fp8_close(q, want):
    """Equal fp8 codes, except where the interpreter's cast is known to be wrong (see module doc)."""
    q, want = q.float(), want.float()
    diff = q != want
    assert diff.float().mean() < 0.05
    halved = q[diff] == want[diff] / 2
    subnormal = (want[diff].abs() <= 2 ** -6) & ((q[diff] - want[diff]).abs() <= 2 ** -8)
    # the neighbouring code (3 mantissa bits: one step is 2^(exponent - 3)); seen ~1 in 700 calls with
    # e4m3fnuz and ue8m0 scales, never more than one value per call
    step = torch.exp2(torch.floor(torch.log2(want[diff].abs().clamp_min(2 ** -6))) - 3)
    neighbour = (q[diff] - want[diff]).abs() == step
    assert torch.all(halved | subnormal | neighbour), list(zip(q[diff].tolist(), want[diff].tolist()))
    only_neighbour = neighbour & ~(halved | subnormal)
    assert only_neighbour.float().sum() <= max(1, 0.001 * q.numel())


def fp8_weight(n, kk, fp8):
    return quantize_fp8_block(torch.randn(n, kk) * 0.05, dtype=fp8)


def exact_act(t, kk, fp8, seed_scale=True):
    """Activations whose 1x128 quantisation is exact: fp8 codes times a power-of-two group scale,
    with one +-fp8_max code per group (so amax / fp8_max is that scale exactly)."""
    fmax = FP8_MAX[fp8]
    codes = (torch.randn(t, kk) * fmax / 4).clamp(-fmax, fmax).to(fp8).float()
    codes[:, ::128] = fmax * torch.sign(torch.randn(t, codes[:, ::128].shape[1]))
    scale = torch.exp2(torch.randint(-8, 2, (t, -(-kk // 128)))).float()
    return codes * scale.repeat_interleave(128, dim=1)[:, :kk]


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant(k, fp8, ue8m0):
    x = torch.randn(7, 300) * 3
    q, s = k.quant.act_quant(x, fp8, ue8m0)
    qr, sr = quantize_act_fp8(x, ue8m0=ue8m0, dtype=fp8)
    assert q.dtype == fp8 and s.shape == sr.shape == (7, 3)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert_fp8_close(q, qr)
    _, sc = k.quant.act_quant(x, fp8, ue8m0, scale_column_major=True)
    assert sc.stride(0) == 1
    torch.testing.assert_close(sc, sr, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("m,split", [(1, 1), (5, 3), (70, 1), (33, 2)])
def test_fp8_gemm_prequantised(k, fp8, m, split):
    n, kk = 200, 300                                     # partial 128-blocks on both N and K
    w = fp8_weight(n, kk, fp8)
    xq, xs = quantize_act_fp8(torch.randn(m, kk), dtype=fp8)
    cfg = k.tuning.GemmConfig(16 if m <= 16 else 32, 64, split)
    y = k.gemm.fp8_gemm(xq, xs, w.data, w.scale, torch.float32, cfg, fp8_max=FP8_MAX[fp8])
    x_real = (xq.double() * xs.double().repeat_interleave(128, 1)[:, :kk])
    assert rel(y, x_real @ dequantize(w, torch.float64).T) < 1e-5
    # split-K is one launch: the last split of each tile sums the partials and resets its counter
    assert not k.counters.tile_counters(y.device, 1).any()
    assert torch.equal(k.gemm.fp8_gemm(xq, xs, w.data, w.scale, torch.float32, cfg, fp8_max=FP8_MAX[fp8]), y)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("m", [1, 9, 100])
def test_linear_op_matches_reference(k, fp8, m):
    """The op as dispatched (in-GEMM quantisation for small M, act_quant + GEMM above): on inputs whose
    quantisation is exact it equals the reference linear; on random inputs it equals the same
    quantisation followed by exact math."""
    n, kk = 136, 384
    w = fp8_weight(n, kk, fp8)
    linear = k.ops.make_ops(target(k, fp8))["linear"]
    x = exact_act(m, kk, fp8)
    assert rel(linear(x, w), ref.linear(x, w)) < 1e-5
    x = torch.randn(m, kk)
    xq, xs = k.quant.act_quant(x, fp8)            # the interpreter's (carry-buggy) cast, shared with the GEMM
    want = (xq.double() * xs.double().repeat_interleave(128, 1)) @ dequantize(w, torch.float64).T
    assert rel(linear(x, w), want) < 1e-5
    assert rel(linear(x, w), ref.linear(x, w)) < 0.15


def test_linear_dense_and_bad_format(k):
    ops = k.ops.make_ops(target(k))
    x, wd = torch.randn(3, 40), torch.randn(24, 40)
    torch.testing.assert_close(ops["linear"](x, QuantWeight(wd, None, "dense")), x @ wd.T)
    with pytest.raises(ValueError, match="int8-w8a8"):
        ops["linear"](x, QuantWeight(wd.to(torch.int8), torch.ones(24), "int8-w8a8"))


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(k, residual):
    x, r, w = torch.randn(6, 300), torch.randn(6, 300), 1 + 0.1 * torch.randn(300)
    if residual:
        y, h = k.norm.add_rms_norm(x, r, w, 1e-6)
        yr, hr = ref.add_rms_norm(x, r, w, 1e-6)
        torch.testing.assert_close(h, hr)
    else:
        y, yr = k.norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_rope_strided_input(k):
    t, h, r = 5, 3, 16
    q = torch.randn(t, h, 24 + r)[..., 24:]                 # a split view, like q_rope in the model
    pos = torch.randint(0, 50, (t,))
    ang = torch.rand(64, r // 2) * 6
    out = k.elementwise.rope(q, pos, ang.cos(), ang.sin())
    torch.testing.assert_close(out, ref.rope(q, pos, ang.cos(), ang.sin()), rtol=1e-5, atol=1e-5)
    kr = torch.randn(t, 40)[:, 24:].unsqueeze(1)             # the shared k_rope head
    torch.testing.assert_close(k.elementwise.rope(kr, pos, ang.cos(), ang.sin()),
                               ref.rope(kr, pos, ang.cos(), ang.sin()), rtol=1e-5, atol=1e-5)


def test_silu_mul(k):
    g, u = torch.randn(4, 300), torch.randn(4, 300)
    torch.testing.assert_close(k.elementwise.silu_mul(g, u), ref.silu_mul(g, u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_write_latent_cache(k, dtype):
    cache = torch.randn(4, 8, 24).to(dtype)
    want = cache.clone()
    lat, kr = torch.randn(5, 16), torch.randn(5, 8)
    slots = torch.randperm(32)[:5]
    k.elementwise.write_latent_cache(cache, lat, kr, slots)
    ref.write_latent_cache(want, lat, kr, slots)
    assert_fp8_close(cache, want)


def _paged(ctx_lens, block_size, c, r, dtype, num_blocks=None):
    mb = max(-(-n // block_size) for n in ctx_lens)
    num_blocks = num_blocks or mb * len(ctx_lens) + 3
    cache = torch.randn(num_blocks, block_size, c + r).to(dtype)
    perm = torch.randperm(num_blocks)
    table = torch.zeros(len(ctx_lens), mb, dtype=torch.int32)
    used = 0
    for i, n in enumerate(ctx_lens):
        nb = -(-n // block_size)
        table[i, :nb] = perm[used:used + nb]
        used += nb
    return cache, table, torch.tensor(ctx_lens, dtype=torch.int32)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_sms", [1, 64])             # 1: one split per token; 64: split-KV + combine
@pytest.mark.parametrize("bs", [16, 128])               # pages smaller than a key tile (row gather) / 2 tiles a page
def test_mla_decode(k, cache_dtype, num_sms, bs):
    h, c, r = 4, 32, 8
    cache, table, lens = _paged([1, 37, 70, 200], bs, c, r, cache_dtype)
    ql, qr = torch.randn(4, h, c), torch.randn(4, h, r)
    tgt = k.tuning.Target("cuda", torch.float8_e4m3fn, num_sms=num_sms)
    out = k.mla.mla_decode(tgt, ql, qr, cache, table, lens, 0.3)
    torch.testing.assert_close(out, ref.mla_decode(ql, qr, cache, table, lens, 0.3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_seqs,draft", [(4, 3), (8, 1), (8, 2), (8, 3), (16, 3)])
def test_mla_decode_verify_chunks_in_a_graph_bucket(k, num_seqs, draft):
    """Issue 18: a speculative verify step is a decode batch of several tokens per sequence ([last,
    d_1..d_k], causal inside the chunk: token j sees its sequence's cache up to its own position),
    padded to the CUDA-graph bucket as graphs.py pads it (context 1, a stale block-table row)."""
    from dsv3.core.batch import Batch, Chunk
    h, c, r, bs = 4, 32, 8, 16
    cache = torch.randn(num_seqs * 6, bs, c + r)
    free = torch.randperm(num_seqs * 6).tolist()
    chunks = []
    for _ in range(num_seqs):
        start = int(torch.randint(1, 70, ()))
        chunks.append(Chunk([0] * (draft + 1), start, [free.pop() for _ in range(-(-(start + draft + 1) // bs))],
                            decode=True))
    batch = Batch.build(chunks, bs, "cpu")
    t = batch.num_decode_tokens
    bucket = 1 << (t - 1).bit_length()
    table = torch.randint(0, cache.shape[0], (bucket, 8), dtype=torch.int32)      # stale rows and columns
    table[:t, : batch.decode_block_table.shape[1]] = batch.decode_block_table
    lens = torch.ones(bucket, dtype=torch.int32)
    lens[:t] = batch.decode_context_lens
    ql, qr = torch.randn(bucket, h, c), torch.randn(bucket, h, r)
    out = k.mla.mla_decode(target(k), ql, qr, cache, table, lens, 0.3)[:t]
    want = ref.mla_decode(ql[:t], qr[:t], cache, batch.decode_block_table, batch.decode_context_lens, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_mla_prefill_varlen_causal(k):
    h, dn, dr, dv = 2, 16, 8, 16
    lq, lk = [3, 20, 1], [3, 29, 6]                 # second and third: a chunk after a cached prefix
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q, kk, v = torch.randn(sum(lq), h, dn + dr), torch.randn(sum(lk), h, dn + dr), torch.randn(sum(lk), h, dv)
    out = k.mla.mla_prefill(target(k), q, kk, v, cu_q, cu_k, 0.25)
    torch.testing.assert_close(out, ref.mla_prefill(q, kk, v, cu_q, cu_k, 0.25), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("e,groups,topk_group,top_k,bias", [(8, 4, 2, 2, True), (32, 8, 4, 8, True),
                                                            (16, 1, 1, 4, False)])
def test_moe_gate(k, e, groups, topk_group, top_k, bias):
    x, w = torch.randn(21, 200), torch.randn(e, 200) * 0.1
    b = 0.1 * torch.randn(e) if bias else None
    spec = GateSpec(top_k, groups, topk_group, True, 2.5)
    wts, ids = k.gate.moe_gate(x, w, b, spec)
    rw, rids = ref.moe_gate(x, w, b, spec)
    order, rorder = ids.sort(-1), rids.sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(wts.gather(1, order.indices), rw.gather(1, rorder.indices), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 5, 40])
def test_moe_gate_v3_routing_one_launch(k, t):
    """DeepSeek-V3's router (256 experts, 8 groups, keep 4, top 8) at decode token counts: one launch,
    the last program of each token tile routes it; the arrival counters are all back to 0 after."""
    x, w = torch.randn(t, 640), torch.randn(256, 640) * 0.1
    b = 0.1 * torch.randn(256)
    spec = GateSpec(8, 8, 4, True, 2.5)
    wts, ids = k.gate.moe_gate(x, w, b, spec, num_sms=132)
    rw, rids = ref.moe_gate(x, w, b, spec)
    order, rorder = ids.sort(-1), rids.sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(wts.gather(1, order.indices), rw.gather(1, rorder.indices), rtol=1e-5, atol=1e-6)
    assert not k.counters.tile_counters(x.device, 1).any()


def _experts(e, inter, d, fp8, first=0):
    def stack(n, kk):
        qs = [quantize_fp8_block(torch.randn(n, kk) * 0.05, dtype=fp8) for _ in range(e)]
        return QuantWeight(torch.stack([q.data for q in qs]), torch.stack([q.scale for q in qs]), qs[0].format)
    return ExpertWeights(stack(inter, d), stack(inter, d), stack(d, inter), first)


def _moe_emulated(k, x, wts, ids, ex, fp8):
    """moe_experts with every activation quantised the way the kernels do (shared interpreter cast)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xq, xs = k.quant.act_quant(x, fp8)
    xr = xq.double() * xs.double().repeat_interleave(128, 1)[:, :x.shape[1]]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - ex.first_expert
            if not 0 <= e < ex.gate.data.shape[0]:
                continue
            g = xr[t] @ dequantize(ref._expert(ex.gate, e), torch.float64).T
            u = xr[t] @ dequantize(ref._expert(ex.up, e), torch.float64).T
            hq, hs = k.quant.act_quant((torch.nn.functional.silu(g) * u).float()[None], fp8)
            hr = (hq.double() * hs.double().repeat_interleave(128, 1)[:, :g.shape[0]])[0]
            out[t] += wts[t, j] * (hr @ dequantize(ref._expert(ex.down, e), torch.float64).T)
    return out


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("t,first", [(1, 0), (6, 0), (9, 3)])   # first=3: expert parallelism, 5 of 8 held
def test_moe_experts(k, fp8, t, first):
    e_total, d, inter, top_k = 8, 256, 160, 3
    ex = _experts(e_total - first, inter, d, fp8, first)
    x = torch.randn(t, d)
    wts = torch.rand(t, top_k)
    ids = torch.stack([torch.randperm(e_total)[:top_k] for _ in range(t)])
    out = k.moe.moe_experts(target(k, fp8), x, wts, ids, ex)
    want = _moe_emulated(k, x, wts, ids, ex, fp8)
    # per token: fp32 rounding (~1e-7), except where the kernel's fp32 hidden activation and the
    # emulation's float64 one sit on either side of an fp8 rounding boundary and quantise to
    # neighbouring codes (module doc; ~1 call in 300 here, rel 1e-5..3e-3 on that token): allow that on
    # one token, never more, and never a large error (a wrong expert, weight or scale is >> 1e-2)
    err, size = (out.double() - want).norm(dim=1), want.norm(dim=1)
    held = size > 0                      # a token whose top-k experts all live on other ranks gets exactly 0
    assert torch.all(err[~held] == 0), err[~held].tolist()
    per_token = err[held] / size[held]
    assert (per_token > 1e-4).sum() <= 1 and per_token.max() < 1e-2, per_token.tolist()
    assert rel(out, ref.moe_experts(x, wts, ids, ex)) < 0.15


def test_moe_align_pads_and_drops(k):
    bm, e = 4, 5
    ids = torch.tensor([[0, 2], [2, 9], [4, 0], [2, 2]])           # 9: not held here
    n = ids.numel()
    max_blocks = -(-n // bm) + min(e, n)
    sorted_ids = torch.full((max_blocks * bm,), -7, dtype=torch.int32)
    block_expert = torch.full((max_blocks,), -7, dtype=torch.int32)
    k.moe.moe_align_kernel[(e,)](ids.reshape(-1), sorted_ids, block_expert, n, 0, max_blocks,
                                 E=e, BLOCK_M=bm, BLOCK_E=8, CHUNK=16, PDL=False)
    # flat rows [0, 2, 2, 9, 4, 0, 2, 2]: expert 0 -> rows 0, 5; expert 2 -> 1, 2, 6, 7; expert 4 -> 4
    assert block_expert.tolist() == [0, 2, 4, -1, -1, -1, -1][:max_blocks]
    assert sorted_ids[:12].tolist() == [0, 5, n, n, 1, 2, 6, 7, 4, n, n, n]
