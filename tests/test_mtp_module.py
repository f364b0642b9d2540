"""The MTP module against a hand-built computation of DESIGN.md's formula, using transformers' layers."""
import random

import torch

from dsv3 import LLM
from dsv3.checkpoints.synthetic import write_checkpoint

from helpers import hf_oracle, make_checkpoint, random_prompts, rel_err, tiny_config


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

    def w(suffix):
        return weights[f"model.layers.{n}.{suffix}"]

    def rms(x, weight, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    with torch.no_grad():
        tokens = torch.tensor([ids])
        h = oracle.model(tokens).last_hidden_state[0]                  # main model's h_i, after model.norm
        emb = torch.nn.functional.embedding(tokens[0, 1:], w("embed_tokens.weight"))   # t_{i+1}
        x = torch.cat([rms(emb, w("enorm.weight")), rms(h[:-1], w("hnorm.weight"))], dim=-1) @ w("eh_proj.weight").T
        positions = torch.arange(len(ids) - 1)[None]                   # slot i uses position i
        layer = oracle.model.layers[1]
        rope = oracle.model.rotary_emb(x[None], positions)
        mask = torch.full((len(ids) - 1, len(ids) - 1), float("-inf")).triu(1)[None, None]
        y = layer(x[None], attention_mask=mask, position_ids=positions, position_embeddings=rope)
        y = y[0] if isinstance(y, tuple) else y
        ref = rms(y[0], w("shared_head.norm.weight")) @ w("shared_head.head.weight").T
    assert ours.shape == (len(ids) - 1, hf["vocab_size"])
    assert rel_err(ours, ref) < 1e-4
