"""The DeepSeek Sparse Attention kernels (dsv3/backends/triton/dsa.py) under TRITON_INTERPRET=1 against the
reference ops, on fresh random float32 data (bf16 arithmetic is wrong in the interpreter), paged caches in
shuffled blocks, ragged contexts, rows with fewer visible tokens than k, and -1 slots."""
import importlib
import os

import pytest
import torch

from dsv3.backends.reference import ops as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests: run without a GPU or with TRITON_INTERPRET=1 (tests/conftest.py)")


@pytest.fixture(scope="module")
def dsa():
    return importlib.import_module("dsv3.backends.triton.dsa")


def paged(lens, page, width, seed, spare=3):
    g = torch.Generator().manual_seed(seed)
    per = [-(-n // page) for n in lens]
    nb = sum(per) + spare
    order = torch.randperm(nb, generator=g).tolist()
    table = torch.zeros(len(lens), max(per), dtype=torch.int32)
    at = 0
    for i, n in enumerate(per):
        table[i, :n] = torch.tensor(order[at:at + n])
        at += n
    return torch.randn(nb, page, width, generator=g), table, g


@pytest.mark.parametrize("hi,di,page", [(16, 32, 8), (5, 24, 16)])
def test_index_scores_and_topk(dsa, hi, di, page):
    lens = [1, 7, page, 3 * page + 5, 40]
    cache, table, g = paged(lens, page, 40 + di, seed=hi + di)
    t = len(lens)
    q = torch.randn(t, hi, di, generator=g)
    w = torch.randn(t, hi, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scores = dsa.index_scores(q, w, cache, table, ctx, block_n=16)
    want = ref.index_scores(q, w, cache, table, ctx)
    assert torch.equal(torch.isinf(scores), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(scores[finite], want[finite], rtol=1e-5, atol=1e-5)
    for k in (1, 6, 16):
        got, exp = dsa.index_topk(want, table, k, chunk=32, block=16), ref.index_topk(want, table, k)
        assert got.shape == exp.shape == (t, min(k, want.shape[1]))
        assert torch.equal(got.sort(-1).values, exp.sort(-1).values), (k, got, exp)
        # rows with fewer visible tokens than k: every visible slot, then -1
        assert all((got[i] >= 0).sum() == min(k, n) for i, n in enumerate(lens))


def test_index_topk_ties_and_negative_scores(dsa):
    """Negative and zero scores (ReLU'd heads with negative weights), exact ties at the boundary: the top k
    values must match, each chosen slot is a real one, none twice."""
    table = torch.arange(6, dtype=torch.int32).flip(0).repeat(3, 1)           # 6 blocks of 8: 48 positions
    scores = torch.tensor([[-3.0, 0.0, 0.0, 0.0, 2.5, -0.5] * 8, [float("-inf")] * 40 + [-1.0] * 8,
                           torch.randn(48).tolist()])
    got = dsa.index_topk(scores, table, 10, chunk=16, block=8)
    exp = ref.index_topk(scores, table, 10)
    for i in range(3):
        def values(slots):
            pos = [(5 - s // 8) * 8 + s % 8 for s in slots.tolist() if s >= 0]   # slot -> position
            return sorted(scores[i, pos].tolist())
        assert values(got[i]) == values(exp[i]) and len(set(got[i].tolist()) - {-1}) == (got[i] >= 0).sum()
    assert (got[1] >= 0).sum() == 8


def test_write_index_cache(dsa):
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(4, 8, 40 + 24, generator=g)
    want = cache.clone()
    k = torch.randn(9, 24, generator=g)
    slots = torch.randperm(32, generator=g)[:9]
    slots[2] = -1
    dsa.write_index_cache(cache, k, slots)
    ref.write_index_cache(want, k, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("h,c,r", [(4, 32, 8), (20, 64, 16)])
def test_sparse_mla(dsa, h, c, r):
    g = torch.Generator().manual_seed(h)
    cache = torch.randn(6, 8, c + r + 24, generator=g)
    t, k = 5, 13
    slots = torch.stack([torch.randperm(48, generator=g)[:k] for _ in range(t)])
    slots[0, 1:] = -1                      # a query that sees one token
    slots[3, 5:9] = -1
    ql, qr = torch.randn(t, h, c, generator=g), torch.randn(t, h, r, generator=g)
    want = ref.sparse_mla(ql, qr, cache, slots, 0.1)
    for splits in (1, 2, None):      # one program per head block, runs merged by log-sum-exp, the default
        out = dsa.sparse_mla(ql, qr, cache, slots, 0.1, block_n=4, splits=splits, num_sms=4)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the reference against float64 naive attention over the chosen rows
    rows = cache.view(-1, cache.shape[-1]).double()
    for i in range(t):
        sel = rows[slots[i][slots[i] >= 0]]
        s = (ql[i].double() @ sel[:, :c].T + qr[i].double() @ sel[:, c:c + r].T) * 0.1
        torch.testing.assert_close(want[i].double(), s.softmax(-1) @ sel[:, :c], rtol=1e-5, atol=1e-6)


def test_triton_op_table_runs_a_v32_model(dsa, tmp_path):
    """The cuda op table (interpreted) carries the sparse ops, and a tiny V3.2 model's logits through them
    match the reference backend's."""
    from dsv3 import LLM
    from dsv3.backends.triton.ops import make_ops
    from dsv3.backends.triton.tuning import Target
    from dsv3.core.ops import Ops
    from test_deepseek_v32 import v32_checkpoint, v32_config
    from helpers import random_prompts, rel_err
    table = make_ops(Target("cuda", torch.float8_e4m3fn, num_sms=8))
    assert {"write_index_cache", "index_scores", "index_topk", "sparse_mla"} <= set(table)
    hf = v32_config(num_hidden_layers=2, num_nextn_predict_layers=0)
    path, _ = v32_checkpoint(tmp_path / "c", hf, seed=int.from_bytes(os.urandom(2), "little"))
    llm = LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 8})
    prompts = random_prompts(hf["vocab_size"], [19, 5], 0)
    want = llm.logits(prompts)
    sparse = {n: table[n] for n in ("write_index_cache", "index_scores", "index_topk", "sparse_mla")}
    llm.model.set_ops(Ops.from_mapping({**{n: getattr(llm.ops, n) for n in llm.ops.providers}, **sparse}, {}))
    got = llm.logits(prompts)
    assert rel_err(got, want) < 1e-4


def test_conformance_cases_for_the_sparse_ops(dsa):
    """`dsv3-run check`'s cases for the DSA ops: the reference passes them (twice: small and V3.2 shapes),
    the Triton kernels pass the small ones, and plausible mistakes fail."""
    from dsv3.plugins.conformance import CheckSetting, check_ops, format_table
    setting = CheckSetting(torch.device("cpu"), torch.float32, ("dense",), block_size=16)
    results = check_ops(ref.SPARSE_OPS, setting, real_shapes=True)
    assert {r.op for r in results} == set(ref.SPARSE_OPS) and all(r.passed for r in results), format_table(results)
    kernels = {n: getattr(dsa, n) for n in ref.SPARSE_OPS}
    results = check_ops(kernels, setting, real_shapes=False)
    assert all(r.passed for r in results), format_table(results)

    def no_relu(q, weights, cache, block_table, context_lens):
        keys = cache[block_table.long()].flatten(1, 2)[..., -q.shape[-1]:].float()
        s = torch.einsum("th,thn->tn", weights, torch.einsum("thd,tnd->thn", q.float(), keys))
        return s.masked_fill(torch.arange(s.shape[1])[None] >= context_lens[:, None], float("-inf"))

    def off_by_one_topk(scores, block_table, k):
        return ref.index_topk(scores, block_table, k + 1)[:, 1:]

    def ignores_minus_one(q_latent, q_rope, cache, slots, scale):
        return ref.sparse_mla(q_latent, q_rope, cache, slots.clamp_min(0), scale)

    wrong = check_ops({"index_scores": no_relu, "index_topk": off_by_one_topk, "sparse_mla": ignores_minus_one},
                      setting, real_shapes=False)
    assert {r.op for r in wrong if not r.passed} == {"index_scores", "index_topk", "sparse_mla"}, format_table(wrong)
