"""The MTP module against a hand-built computation of DESIGN.md's formula, using transformers' layers."""
import random

from dsv3 import LLM
from dsv3.checkpoints.synthetic import write_checkpoint

from helpers import hand_built_mtp_logits, hf_oracle, make_checkpoint, random_prompts, rel_err, tiny_config


def test_mtp_logits_match_hand_built_formula(tmp_path):
    hf = tiny_config(num_hidden_layers=2, first_k_dense_replace=1)
    seed = random.randrange(2**31)
    path, weights = make_checkpoint(tmp_path / "c", hf, seed=seed, tokenizer=False)
    # the MTP layer's decoder block is a copy of layer 1 (a MoE layer); its own norms, eh_proj and head stay random
    n = hf["num_hidden_layers"]
    for name in list(weights):
        if name.startswith("model.layers.1."):
            weights[f"model.layers.{n}." + name[len("model.layers.1."):]] = weights[name].clone()
    write_checkpoint(path, hf, weights)
    llm = LLM(path, backend="cpu")
    oracle = hf_oracle(hf, weights)
    ids = random_prompts(hf["vocab_size"], [19], seed)[0]
    ours = llm.mtp_logits([ids])[0]                                    # [T-1, V]

    ref = hand_built_mtp_logits(oracle, weights, n, ids)              # layer 1: the block the MTP layer copies
    assert ours.shape == (len(ids) - 1, hf["vocab_size"])
    assert rel_err(ours, ref) < 1e-4
