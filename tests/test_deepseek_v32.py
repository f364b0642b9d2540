"""DeepSeek-V3.2 (DeepSeek Sparse Attention): our logits against transformers' DeepseekV32ForCausalLM (fp32,
CPU) on tiny random configs whose prompts are longer than index_topk, so the indexer's selection decides
what each query sees; cached decode (absorbed sparse MLA over the paged cache) equal to full recompute;
the MTP layer (with its own indexer) against a hand-built computation through transformers' own layer.

Index heads are 16 wide enough that a cached token's score is almost never exactly 0 (all ReLUs off):
exact ties at the top-k boundary would let two correct implementations choose differently.
"""
import json
import random

import pytest
import torch

from dsv3 import LLM
from dsv3.core.batch import Chunk
from dsv3.core.cache import LatentCache
from dsv3.checkpoints.synthetic import random_weights, to_checkpoint_format, write_checkpoint

from helpers import (check_decode_beside_chunked_prefill, hand_built_mtp_logits, hf_oracle, random_prompts, rel_err,
                     run_chunks, tiny_config)
from dsv3.core.config import ModelConfig

YARN_SHORT = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def v32_config(**changes) -> dict:
    return tiny_config(**{**dict(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
                                 index_n_heads=16, index_head_dim=32, index_topk=8, rope_scaling=YARN_SHORT),
                          **changes})


def v32_checkpoint(path, hf_config, seed, fmt="dense"):
    weights = random_weights(ModelConfig.from_hf(hf_config), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name in weights:   # an indexer with some spread: LayerNorm bias and head weights well away from 0
        if name.endswith("k_norm.bias") or name.endswith("weights_proj.weight"):
            weights[name] = torch.randn(weights[name].shape, generator=g) * 0.5
    write_checkpoint(path, hf_config, to_checkpoint_format(weights, fmt, torch.float32), fmt=fmt)
    return path, weights


def hf_v32_oracle(hf_config: dict, weights: dict):
    """transformers' DeepseekV32ForCausalLM (fp32, eager) holding the same weights (MTP layer left out)."""
    return hf_oracle(hf_config, weights, v32=True)


CONFIGS = {
    "grouped-yarn-topk8": v32_config(),
    "all-moe-one-group-topk5": v32_config(first_k_dense_replace=0, n_group=1, topk_group=1, index_topk=5,
                                          rope_scaling=None, index_n_heads=12, index_head_dim=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name, one_thread, monkeypatch):
    monkeypatch.setattr("dsv3.core.model.SCORE_ROWS", 16)     # the indexer scores the 74 queries in 5 runs
    hf_config = CONFIGS[name]
    seed = random.randrange(2**31)
    path, weights = v32_checkpoint(tmp_path / "ckpt", hf_config, seed)
    llm = LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 8})
    assert llm.config.sparse_attention and llm.cache.layers[0].shape[-1] == llm.config.cache_dim
    oracle = hf_v32_oracle(hf_config, weights)
    prompts = random_prompts(hf_config["vocab_size"], [45, 6, 23], seed)     # ragged; two longer than index_topk
    ours = llm.logits(prompts)
    refs = []
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            refs.append(oracle(torch.tensor([ids])).logits[0])
        err = rel_err(ours[i, : len(ids)], refs[i])
        assert err < 1e-4, f"{name} seed={seed} prompt {i}: relative error {err:.2e}"
    # the selection bites: the same weights attending densely (index_topk >= every prompt) give other logits
    dense_cfg = dict(hf_config, index_topk=64)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "index_topk": 64}))
    dense = LLM(path, backend="cpu", dtype="float32").logits(prompts[:1])[0]
    assert rel_err(dense, refs[0]) > 1e-3, "index_topk did not change the logits: the test cannot see the selection"
    assert dense_cfg["index_topk"] > len(prompts[0])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = v32_checkpoint(tmp_path_factory.mktemp("v32") / "ckpt", v32_config(index_topk=6),
                             seed=random.randrange(2**31))
    return LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 4})


def test_cached_decode_equals_full_recompute(llm, one_thread):
    """Two prompts prefilled, then decoded token by token beside a third sequence's chunked prefill in the
    same steps: every row's logits equal recomputing its whole sequence (blocks of 4, top-6 selection)."""
    seqs = random_prompts(llm.config.vocab_size, [11, 3, 24], random.randrange(2**31))
    cache = LatentCache(llm.model.num_cache_layers, 48, 4, llm.config.cache_dim, torch.float32, "cpu")
    blocks = [list(range(0, 16))[::-1], list(range(16, 32)), list(range(32, 48))]   # out-of-order blocks too
    done, g = check_decode_beside_chunked_prefill(llm, cache, seqs, blocks, steps=5, chunk=7)
    # and decode-only steps (what a captured graph runs: decode tables only) agree too
    for i in range(2):
        tok = torch.randint(2, llm.config.vocab_size, (1,), generator=g).item()
        out = run_chunks(llm, cache, [Chunk([tok], done[i], blocks[i], decode=True)])
        seqs[i].append(tok)
        done[i] += 1
        assert rel_err(out[0][-1], llm.logits([seqs[i]])[0, -1]) < 1e-4


def test_greedy_generation_matches_full_recompute(llm, one_thread):
    """Through the engine (chunked prefill, decode): each greedy token is the full-recompute argmax."""
    prompts = random_prompts(llm.config.vocab_size, [17, 9], random.randrange(2**31))
    outs, _ = llm.generate_ids(prompts, max_new_tokens=5, temperature=0.0, ignore_eos=True)
    for p, o in zip(prompts, outs):
        logits = llm.logits([p + o])[0]
        for j, tok in enumerate(o):
            row = logits[len(p) - 1 + j]
            assert tok == int(row.argmax()) or row.max() - row[tok] < 1e-5 * row.abs().max()


def test_mtp_layer_with_its_indexer_matches_hand_built_formula(tmp_path, one_thread):
    hf = v32_config(num_hidden_layers=2, first_k_dense_replace=1, index_topk=5)
    seed = random.randrange(2**31)
    path, weights = v32_checkpoint(tmp_path / "c", hf, seed)
    n = hf["num_hidden_layers"]
    for name in list(weights):   # the MTP layer's decoder block (indexer included) is a copy of layer 1
        if name.startswith("model.layers.1."):
            weights[f"model.layers.{n}." + name[len("model.layers.1."):]] = weights[name].clone()
    write_checkpoint(path, hf, weights)
    llm = LLM(path, backend="cpu", dtype="float32")
    assert llm.model.mtp.self_attn.indexer is not None
    oracle = hf_v32_oracle(hf, weights)
    ids = random_prompts(hf["vocab_size"], [21], seed)[0]
    ours = llm.mtp_logits([ids])[0]

    ref = hand_built_mtp_logits(oracle, weights, n, ids)              # indexer included, through transformers
    assert rel_err(ours, ref) < 1e-4


OFFICIAL_V32 = __import__("pathlib").Path(__file__).parent / "data" / "deepseek-v3.2-config.json"


def test_official_v32_layout_and_plan(capsys):
    """DeepSeek-V3.2's config (V3's with the indexer fields): the meta-device model expects V3's 91,991
    tensors plus 7 indexer tensors in each of the 62 layers (MTP included), FP8 wq_b / wk with block
    scales, bf16 weights_proj and k_norm (no V3.2 tensor inventory is at hand: names and shapes follow
    transformers' DeepseekV32 and DeepSeek's release notes; the loader accepts k_norm in any float dtype and
    converts BF16 wq_b / wk if a checkpoint stores them so); plan counts the indexer key in the cache."""
    from dsv3.backends.reference.ops import OPS
    from dsv3.commands.main import main
    from dsv3.core.loader import expected_tensors
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    cfg = ModelConfig.from_file(OFFICIAL_V32)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.cache_dim) == (64, 128, 2048, 704)
    with torch.device("meta"):
        model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "fp8-block", torch.bfloat16)
    names = expected_tensors(model)
    assert len(names) == 91991 + 62 * 7
    fp8, bf16, f32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
    for layer in (0, 61):
        pre = f"model.layers.{layer}.self_attn.indexer."
        assert {n[len(pre):]: (s, d) for n, (s, d) in names.items() if n.startswith(pre)} == {
            "wq_b.weight": ([8192, 1536], fp8), "wq_b.weight_scale_inv": ([64, 12], f32),
            "wk.weight": ([128, 7168], fp8), "wk.weight_scale_inv": ([1, 56], f32),
            "k_norm.weight": ([128], bf16), "k_norm.bias": ([128], bf16), "weights_proj.weight": ([64, 7168], bf16)}
    assert main(["plan", "--config", str(OFFICIAL_V32), "--profile", "cuda-fp8", "--gpu-memory", "141GiB"]) == 0
    out = capsys.readouterr().out
    assert "87,296 bytes per token" in out and "(576 + 128 indexer)" in out     # 62 x 704 x 2 (V3: 71,424)
    assert "needs 8 GPUs (tp 8, ep 8)" in out


def test_fp8_v32_checkpoint_loads_indexer_weights_as_stored(tmp_path, one_thread):
    """An FP8 V3.2 checkpoint (wq_b, wk in FP8 with block scales; weights_proj and k_norm unquantised): the
    cpu backend keeping FP8 multiplies the dequantised weights exactly, so it equals the same checkpoint
    dequantised at load; weights_proj is never quantised."""
    hf = v32_config(num_hidden_layers=2, num_nextn_predict_layers=0)
    path, _ = v32_checkpoint(tmp_path / "fp8", hf, seed=random.randrange(2**31), fmt="fp8-block")
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = {n: f.get_slice(n).get_dtype() for n in f.keys() if ".indexer." in n and "layers.0." in n}
    assert stored["model.layers.0.self_attn.indexer.wq_b.weight"] == "F8_E4M3"
    assert "model.layers.0.self_attn.indexer.wk.weight_scale_inv" in stored
    assert stored["model.layers.0.self_attn.indexer.weights_proj.weight"] != "F8_E4M3"
    kept = LLM(path, backend="cpu", dtype="float32", weight_format="fp8-block")
    indexer = kept.model.model.layers[0].self_attn.indexer
    assert indexer.wq_b.format == "fp8-block" and indexer.weights_proj.format == "dense"
    prompts = random_prompts(hf["vocab_size"], [20, 9], 0)
    assert rel_err(kept.logits(prompts), LLM(path, backend="cpu", dtype="float32").logits(prompts)) < 1e-5


def test_mtp_speculative_decoding_is_greedy_exact(tmp_path, one_thread):
    """V3.2 with MTP drafts (k = 2): verify chunks are multi-token decode rows over the sparse cache, and
    rejected drafts roll back; greedy output equals plain decoding."""
    hf = v32_config(num_hidden_layers=2, index_topk=6)
    path, _ = v32_checkpoint(tmp_path / "c", hf, seed=random.randrange(2**31))
    prompts = random_prompts(hf["vocab_size"], [13, 8, 21], random.randrange(2**31))
    plain = LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 4})
    spec = LLM(path, backend="cpu", dtype="float32", **{"kv_cache.block_size": 4, "speculative.method": "mtp",
                                                        "speculative.num_draft_tokens": 2})
    want, _ = plain.generate_ids(prompts, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    got, _ = spec.generate_ids(prompts, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert got == want


def test_tensor_and_expert_parallel_match_one_process(tmp_path):
    """2 gloo processes at tp 2 x ep 2: the indexer is whole on every rank (its heads are not split), MLA's
    heads and the experts are; logits, MTP logits and greedy tokens equal one process's."""
    from test_parallel import ALL_TO_ALL, _check, _single, _spawn
    hf = v32_config(num_attention_heads=6, num_key_value_heads=6, n_routed_experts=6, n_group=3, topk_group=2,
                    num_experts_per_tok=2, vocab_size=509, index_topk=7)
    seed = random.randrange(2**31)
    path, _ = v32_checkpoint(tmp_path / "ckpt", hf, seed)
    prompts = random_prompts(509, [30, 5, 12], seed)
    cases = {"v32-tp2-ep2": (str(path), 2, 2, ALL_TO_ALL)}
    ranks, _ = _spawn(2, tmp_path, (cases, prompts, seed))
    _check(ranks, cases, {str(path): _single(path, prompts, seed)})


def test_reference_index_ops_against_float64_loops():
    """The reference index_scores / index_topk / write_index_cache against per-token float64 loops over the
    block table (shuffled blocks, ragged contexts, a -1 slot)."""
    from dsv3.backends.reference import ops as ref
    g = torch.Generator().manual_seed(random.randrange(2**31))
    page, hi, di, lens = 4, 6, 12, [1, 5, 9, 14]
    cache = torch.randn(16, page, 20 + di, generator=g)
    table = torch.randperm(16, generator=g)[:16].view(4, 4).to(torch.int32)
    k_new, slots = torch.randn(3, di, generator=g), torch.tensor([5, -1, 33])
    want_cache = cache.clone()
    want_cache.view(-1, 20 + di)[[5, 33], 20:] = k_new[[0, 2]]
    ref.write_index_cache(cache, k_new, slots)
    assert torch.equal(cache, want_cache)
    q, w = torch.randn(4, hi, di, generator=g), torch.randn(4, hi, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scores = ref.index_scores(q, w, cache, table, ctx)
    flat = cache.view(-1, 20 + di).double()
    for t, n in enumerate(lens):
        for p in range(16):
            slot = int(table[t, p // page]) * page + p % page
            want = sum(w[t, h].double() * max(float(q[t, h].double() @ flat[slot, 20:]), 0.0) for h in range(hi))
            assert (p >= n and scores[t, p] == float("-inf")) or abs(float(scores[t, p]) - want) < 1e-5
        chosen = ref.index_topk(scores, table, 3)[t].tolist()
        slot_of = {int(table[t, p // page]) * page + p % page: p for p in range(n)}
        best = sorted(range(n), key=lambda p: -float(scores[t, p]))[:3]
        # the k best scores; which of two tied positions is taken is free (scores tie at 0.0 when every
        # head's q.k is negative: the ReLU zeroes them all)
        assert all(c in slot_of for c in chosen if c >= 0) and len(set(chosen) - {-1}) == min(3, n)
        assert sorted(float(scores[t, slot_of[c]]) for c in chosen if c >= 0) == sorted(float(scores[t, p]) for p in best)
        assert chosen.count(-1) == 3 - min(3, n)
