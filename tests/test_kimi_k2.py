"""Kimi-K2-style configs (DeepSeek-V3's architecture, other sizes): one expert group, 64 heads, one dense
layer, routed_scaling_factor 2.827, many experts. Logits against transformers' DeepseekV3ForCausalLM at
a tiny scale, and `dsv3-run plan` on Kimi-K2's full config (tests/data/kimi-k2-config.json, written from
the published numbers: 61 layers, 7168 hidden, 64 heads, 384 routed experts + 1 shared, 8 per token; its
model_type is Moonshot's own `kimi_k2`, as the released config.json says)."""
import json
import random
import re
from pathlib import Path

import pytest
import torch

from dsv3 import LLM
from dsv3.commands.main import main
from dsv3.core.config import ModelConfig
from dsv3.core.layout import Mesh
from dsv3.parallel import memory

from helpers import hf_oracle, make_checkpoint, random_prompts, rel_err, tiny_config

KIMI = Path(__file__).parent / "data" / "kimi-k2-config.json"
GiB = 2**30
# Kimi-K2's YaRN: beta_fast = beta_slow = 1 (DeepSeek-V3: 32 / 1); stretched at tiny scale so prompts pass it
KIMI_YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16, "beta_fast": 1.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def kimi_tiny(**changes):
    return tiny_config(**{**dict(num_attention_heads=64, num_key_value_heads=64, n_group=1, topk_group=1,
                                 first_k_dense_replace=1, routed_scaling_factor=2.827, n_routed_experts=48,
                                 num_experts_per_tok=8, num_hidden_layers=3, rope_scaling=KIMI_YARN,
                                 rope_theta=50000.0), **changes})


@pytest.mark.parametrize("changes", [{}, {"n_routed_experts": 96, "norm_topk_prob": False, "q_lora_rank": None,
                                         "model_type": "kimi_k2"}],
                         ids=["kimi-48-experts", "kimi-96-experts-unnormalised-q_proj"])
def test_kimi_like_logits_match_transformers(tmp_path, changes, one_thread):
    hf_config = kimi_tiny(**changes)
    seed = random.randrange(2**31)
    path, weights = make_checkpoint(tmp_path / "ckpt", hf_config, seed=seed)
    # a random nonzero correction bias: with one group, only it and the scores decide the top 8
    g = torch.Generator().manual_seed(seed)
    for name in weights:
        if name.endswith("e_score_correction_bias"):
            weights[name] = 0.05 * torch.randn(weights[name].shape, generator=g)
    from dsv3.checkpoints.synthetic import to_checkpoint_format, write_checkpoint
    write_checkpoint(path, hf_config, to_checkpoint_format(weights, "dense", torch.float32))
    llm = LLM(path, backend="cpu", dtype="float32")
    assert llm.config.n_group == 1 and llm.config.num_attention_heads == 64
    oracle = hf_oracle(hf_config, weights)
    prompts = random_prompts(hf_config["vocab_size"], [41, 6, 23], seed)   # ragged, past YaRN's original 16
    ours = llm.logits(prompts)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = oracle(torch.tensor([ids])).logits[0]
        err = rel_err(ours[i, : len(ids)], ref)
        assert err < 1e-4, f"{changes} seed={seed} prompt {i}: relative error {err:.2e}"


def _by_hand(cfg: dict) -> int:
    """Kimi-K2's parameter count from its config alone (independent of the model code)."""
    d, h, v = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    qk, nope, vd = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    c, r, ql = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["q_lora_rank"]
    attention = d * ql + ql + ql * h * qk + d * (c + r) + c + c * h * (nope + vd) + h * vd * d
    e, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    moe = e * 3 * d * mi + cfg["n_shared_experts"] * 3 * d * mi + e * d + e
    dense = 3 * d * cfg["intermediate_size"]
    layers, k = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    return layers * (attention + 2 * d) + k * dense + (layers - k) * moe + 2 * v * d + d


def test_kimi_k2_full_config_parameters_and_memory():
    raw = json.loads(KIMI.read_text())
    cfg = ModelConfig.from_file(KIMI)
    n = memory.parameter_count(cfg, with_mtp=False)
    assert n == _by_hand(raw) and 1.0e12 < n < 1.05e12                      # "1T parameters"
    fp8 = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, False, Mesh())
    assert 950 * GiB < fp8 < 965 * GiB                                      # ~1 byte per weight + scales + bf16 rest
    # expert parallelism over 16 ranks: 24 experts each, so about 1/16 of the experts' bytes per rank
    per_rank = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, False, Mesh(16, 0, 16, 16))
    assert fp8 / 17 < per_rank < fp8 / 15


def _plan(capsys, *args):
    code = main(["plan", *args])
    return code, capsys.readouterr()


def test_plan_for_kimi_k2(capsys):
    code, out = _plan(capsys, "--config", str(KIMI), "--profile", "cuda-fp8", "--gpu-memory", "141GiB")
    assert code == 0, out.err
    assert "384 routed experts, 64 heads" in out.out and "1026.4 B parameters" in out.out
    assert "70,272 bytes per token" in out.out                    # 61 layers x 576 x 2, no MTP layer
    # 8 x H200 misses by half a GiB with the profile's 262,144-token cache; 16 hold it
    assert re.search(r"^\s+8\s+8\s+8\s+120\.8 GiB\s.*17\.2 GiB.*no$", out.out, re.M), out.out
    assert "needs 16 GPUs (tp 16, ep 16)" in out.out
    code, out = _plan(capsys, "--config", str(KIMI), "--profile", "cuda-fp8", "--gpu-memory", "141GiB",
                      "--max-cache-tokens", "65536")
    assert code == 0 and "needs 8 GPUs (tp 8, ep 8)" in out.out
    assert re.search(r"120\.8 GiB weights \+ .*4\.3 GiB latent cache", out.out), out.out
    code, out = _plan(capsys, "--config", str(KIMI), "--profile", "cuda-fp8", "--gpu-memory", "80GiB")
    assert code == 0 and "needs 32 GPUs (tp 16, ep 32)" in out.out and "--nnodes 4" in out.out
