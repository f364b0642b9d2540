"""The embedded demo model: shipped in the package, in the official HF FP8 layout, <= 60 MB (issue 24), and a
language model (deterministic, non-degenerate greedy completions)."""
import json

import pytest
import torch

from dsv3.core.config import ModelConfig
from dsv3.demo import DEMO_DIR, demo_model_path
from dsv3.core.loader import Checkpoint, checkpoint_format

MAX_BYTES = 60_000_000


@pytest.fixture(scope="module")
def llm():
    from dsv3 import LLM
    return LLM()    # no model path: the embedded default


def test_shipped_inside_the_package():
    import dsv3
    assert demo_model_path() == DEMO_DIR
    assert DEMO_DIR.parent == __import__("pathlib").Path(dsv3.__file__).parent
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.jsonl"):
        assert (DEMO_DIR / name).is_file(), name


def test_at_most_60_mb():
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= MAX_BYTES


def test_official_fp8_layout_with_mtp_layer():
    raw = json.loads((DEMO_DIR / "config.json").read_text())
    q = raw["quantization_config"]
    assert (q["quant_method"], q["fmt"], q["weight_block_size"]) == ("fp8", "e4m3", [128, 128])
    cfg = ModelConfig.from_hf(raw)
    # the architecture the issue asks for: MLA with q/kv low rank, >= 8 routed experts in groups, a
    # shared expert, a dense first layer, YaRN, one MTP module
    assert cfg.q_lora_rank and cfg.kv_lora_rank
    assert cfg.n_routed_experts >= 8 and cfg.n_group > 1 and cfg.n_shared_experts >= 1
    assert cfg.first_k_dense_replace >= 1 and cfg.rope_scaling is not None
    assert cfg.num_nextn_predict_layers == 1

    ckpt = Checkpoint(DEMO_DIR)
    try:
        assert checkpoint_format(ckpt) == "fp8-block"
        names = set(ckpt.names())
        n = cfg.num_hidden_layers
        attn = "model.layers.1.self_attn.q_a_proj"
        assert ckpt.st_dtype(f"{attn}.weight") == "F8_E4M3" and ckpt.st_dtype(f"{attn}.weight_scale_inv") == "F32"
        expert = "model.layers.1.mlp.experts.15.down_proj"
        assert {f"{expert}.weight", f"{expert}.weight_scale_inv"} <= names
        assert ckpt.st_dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
        for mtp in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                    "shared_head.norm.weight", "shared_head.head.weight", "self_attn.kv_b_proj.weight_scale_inv",
                    "mlp.gate.weight"):
            assert f"model.layers.{n}.{mtp}" in names, mtp
        assert ckpt.st_dtype("model.embed_tokens.weight") == "BF16"
        assert not any(name.startswith(f"model.layers.{n + 1}.") for name in names)
    finally:
        ckpt.close()


def test_greedy_completion_is_deterministic_and_sensible(llm):
    prompt = "def __init__(self, name):"
    first = llm.generate([prompt], max_new_tokens=16)[0]
    second = llm.generate([prompt], max_new_tokens=16)[0]
    assert first == second
    assert "self.name = name" in first                    # it has learnt Python, not just bytes
    ids = llm._tokenizer().encode(first, add_bos=False)
    assert len(set(ids)) >= 4                             # not one token repeated


def test_mtp_layer_runs(llm):
    ids = llm._tokenizer().encode("import os\nimport sys\n")
    assert llm.model.has_mtp
    logits = llm.mtp_logits([ids])
    assert logits.shape == (1, len(ids) - 1, llm.config.vocab_size) and torch.isfinite(logits).all()
