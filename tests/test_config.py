"""config.json parsing: both transformers styles, and clear errors naming the key."""
import json

import pytest

from dsv3.core.config import ModelConfig
from dsv3.core.errors import ConfigError

from helpers import tiny_config


def test_transformers_4_and_5_styles_agree():
    v4 = tiny_config()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0,
                             **{k: v for k, v in v4["rope_scaling"].items() if k != "type"}}
    v5["dtype"] = "bfloat16"
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)


def test_optional_features():
    cfg = ModelConfig.from_hf(tiny_config(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                          num_nextn_predict_layers=0, rope_scaling=None, eos_token_id=[1, 7]))
    assert cfg.q_lora_rank is None and cfg.rope_scaling is None and cfg.eos_token_ids == (1, 7)


@pytest.mark.parametrize("change, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 100}, "num_experts_per_tok"),
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 2}}, "original_max_position_embeddings"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
     "quantization_config.weight_block_size"),
])
def test_unrunnable_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_hf(tiny_config(**change))


def test_missing_required_key_and_bad_json(tmp_path):
    cfg = tiny_config()
    del cfg["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_hf(cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_file(tmp_path / "config.json")
