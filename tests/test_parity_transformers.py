"""Oracle 1: our logits match transformers' DeepseekV3ForCausalLM on random tiny configs (fp32, CPU)."""
import random

import pytest
import torch

from dsv3 import LLM

from helpers import hf_oracle, make_checkpoint, random_prompts, rel_err, tiny_config

YARN_SHORT = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CONFIGS = {
    # q low-rank, grouped routing with a random bias (so -inf group masking matters), dense first layer,
    # YaRN with prompts longer than original_max_position_embeddings
    "q_lora-grouped-yarn": tiny_config(rope_scaling=YARN_SHORT),
    "q_proj-no-lora": tiny_config(q_lora_rank=None, rope_scaling=YARN_SHORT),
    "one-group": tiny_config(n_group=1, topk_group=1),
    "all-moe-unnormalised": tiny_config(first_k_dense_replace=0, norm_topk_prob=False),
    "two-dense-no-rope-scaling": tiny_config(first_k_dense_replace=2, rope_scaling=None, n_group=2, topk_group=1,
                                             num_experts_per_tok=3),
    "transformers-5-style": {**{k: v for k, v in tiny_config().items() if k not in ("rope_scaling", "torch_dtype")},
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **{
                                 k: v for k, v in YARN_SHORT.items() if k != "type"}}, "dtype": "bfloat16"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf_config = CONFIGS[name]
    seed = random.randrange(2**31)
    path, weights = make_checkpoint(tmp_path / "ckpt", hf_config, seed=seed)
    llm = LLM(path, backend="cpu", dtype="float32")
    oracle = hf_oracle(hf_config, weights)
    prompts = random_prompts(hf_config["vocab_size"], [37, 5, 20], seed)   # ragged, one past 2x the YaRN original
    ours = llm.logits(prompts)
    assert ours.shape == (3, 37, hf_config["vocab_size"])
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = oracle(torch.tensor([ids])).logits[0]
        err = rel_err(ours[i, : len(ids)], ref)
        assert err < 1e-4, f"{name} seed={seed} prompt {i}: relative error {err:.2e}"
    # padding rows are zeros and the rows of a sequence do not depend on what it is batched with
    assert torch.all(ours[1, 5:] == 0)
    alone = llm.logits([prompts[1]])[0]
    assert rel_err(alone, ours[1, :5]) < 1e-5
