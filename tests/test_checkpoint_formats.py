"""FP8 checkpoints in the official layout (written by our quantiser) and sharded checkpoints load right."""
import random

import torch

from dsv3 import LLM
from dsv3.core.config import ModelConfig
from dsv3.checkpoints.synthetic import random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer
from dsv3.core.weights import QuantWeight, dequantize

from helpers import CORPUS, random_prompts, rel_err, tiny_config

# widths that are not multiples of 128 and span several blocks: partial edge blocks everywhere
# (kv_a_proj_with_mqa has 136 + 8 = 144 rows -> 2 row blocks; hidden 192 -> 2 column blocks)
WIDE = tiny_config(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, kv_lora_rank=136,
                   q_lora_rank=200, num_attention_heads=2, num_key_value_heads=2)


def _dequantised(fp8_tensors: dict) -> dict:
    out = {}
    for name, t in fp8_tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = fp8_tensors.get(name[: -len("weight")] + "weight_scale_inv")
        out[name] = (dequantize(QuantWeight(t, scale, "fp8-block"), torch.float64).float() if scale is not None
                     else t.float())
    return out


def test_fp8_checkpoint_matches_dequantised_weights(tmp_path):
    seed = random.randrange(2**31)
    cfg = ModelConfig.from_hf(WIDE)
    fp8 = to_checkpoint_format(random_weights(cfg, seed, std=0.1), "fp8-block")
    assert fp8["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    assert fp8["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    write_checkpoint(tmp_path / "fp8", WIDE, fp8, fmt="fp8-block")
    write_checkpoint(tmp_path / "deq", WIDE, _dequantised(fp8))
    prompts = random_prompts(cfg.vocab_size, [21, 7], seed)
    ref = LLM(tmp_path / "deq", backend="cpu").logits(prompts)
    dense = LLM(tmp_path / "fp8", backend="cpu", weight_format="dense").logits(prompts)   # dequantised at load
    kept = LLM(tmp_path / "fp8", backend="cpu", weight_format="fp8-block").logits(prompts)  # fp8 kept, op dequantises
    assert rel_err(dense, ref) < 1e-5
    assert rel_err(kept, ref) < 1e-5


def test_sharded_checkpoint_loads_the_same(tmp_path):
    seed = random.randrange(2**31)
    hf = tiny_config()
    tensors = to_checkpoint_format(random_weights(ModelConfig.from_hf(hf), seed, std=0.1), "fp8-block")
    write_checkpoint(tmp_path / "one", hf, tensors, num_shards=1, fmt="fp8-block")
    write_checkpoint(tmp_path / "many", hf, tensors, num_shards=5, fmt="fp8-block")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) == 5
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    prompts = random_prompts(hf["vocab_size"], [12], seed)
    a = LLM(tmp_path / "one", backend="cpu").logits(prompts)
    b = LLM(tmp_path / "many", backend="cpu").logits(prompts)
    assert torch.equal(a, b)


def test_bf16_checkpoint_and_generation(tmp_path):
    hf = tiny_config()
    write_checkpoint(tmp_path / "c", hf, to_checkpoint_format(
        random_weights(ModelConfig.from_hf(hf), 5, std=0.1), "dense", torch.bfloat16))
    write_tokenizer(tmp_path / "c", hf["vocab_size"], CORPUS)
    llm = LLM(tmp_path / "c", backend="cpu", dtype="bfloat16")
    assert llm.model.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    texts = llm.generate(["hello world", "def add"], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
