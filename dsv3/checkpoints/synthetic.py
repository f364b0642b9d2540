"""Random DeepSeek-V3 checkpoints in the official HF layout, for tests, benchmarks and the demo.

Weights are drawn from a seeded generator, so the same (config, seed) gives the same files on any
machine. FP8 checkpoints are written by our own quantiser (weight_scale_inv per 128x128 block).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.core.config import ModelConfig
from dsv3.core.model import DeepseekV3, Linear
from dsv3.core.quant import quantize_fp8_block

TINY_CONFIG = {  # every DeepSeek-V3 feature at toy size: q/kv low rank, grouped routing, dense layer, YaRN, MTP
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 1024,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False,
}
# DeepSeek-V3.2 at toy size: the same plus a lightning indexer whose top-16 bites on prompts past 16 tokens
TINY_V32_CONFIG = {**TINY_CONFIG, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
                   "index_n_heads": 16, "index_head_dim": 32, "index_topk": 16}


def random_weights(cfg: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Checkpoint-named float32 tensors (experts unstacked), norms near 1, a nonzero router bias."""
    from dsv3.core.loader import expected_tensors
    from dsv3.backends.reference.ops import OPS
    from dsv3.core.ops import Ops
    with torch.device("meta"):
        model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "dense", torch.float32)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _) in expected_tensors(model).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t
    return out


def quantizable(name: str) -> bool:
    """Is checkpoint tensor `name` one of the projections the official checkpoint stores in FP8?"""
    return name.endswith(".weight") and any(f".{p}." in name or name.endswith(f".{p}.weight") for p in (
        "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj", "wq_b", "wk"))   # wq_b, wk: V3.2's indexer (weights_proj stays bf16)


def to_checkpoint_format(weights: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype = torch.bfloat16,
                         ue8m0: bool = False) -> dict[str, torch.Tensor]:
    """Dense float tensors -> what a checkpoint of `fmt` (dense or fp8-block) stores."""
    out = {}
    for name, t in weights.items():
        if fmt == "fp8-block" and quantizable(name):
            q = quantize_fp8_block(t, ue8m0=ue8m0)
            out[name], out[name[: -len("weight")] + "weight_scale_inv"] = q.data, q.scale
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(dtype)
    return out


def write_checkpoint(path: str | Path, hf_config: dict, tensors: dict[str, torch.Tensor],
                     num_shards: int = 1, fmt: str = "dense", ue8m0: bool = False) -> Path:
    """Write config.json and safetensors (one file, or shards + model.safetensors.index.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    if fmt == "fp8-block":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128], **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    if num_shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"))
        return path
    per = -(-len(names) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def random_checkpoint(path: str | Path, hf_config: dict | None = None, seed: int = 0, fmt: str = "dense",
                      num_shards: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    hf_config = dict(hf_config or TINY_CONFIG)
    cfg = ModelConfig.from_hf(hf_config)
    tensors = to_checkpoint_format(random_weights(cfg, seed), fmt, dtype)
    return write_checkpoint(path, hf_config, tensors, num_shards, fmt)


SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                  "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                  "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                  "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"]
THINK_TOKENS = ["<think>", "</think>"]


def _reference_chat_template() -> str:
    ref = Path(__file__).resolve().parent.parent / "core" / "chat_template.jinja"
    return ref.read_text()


def write_tokenizer(path: str | Path, vocab_size: int, corpus: list[str], chat_template: str | None = None,
                    released_markers: bool = False) -> None:
    """A byte-level BPE tokenizer trained on `corpus`, with DeepSeek's special tokens (ids 0 and 1 are
    BOS and EOS, as in V3) and `chat_template` (default: DeepSeek-V3's).

    `released_markers`: also `<think>` and `</think>`, and every marker but BOS and EOS flagged
    non-special, as in DeepSeek's released tokenizer.json files, so decoding keeps the tool-call and
    reasoning markers in the text (where the server's parsers read them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (THINK_TOKENS if released_markers else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    if released_markers:
        data = json.loads((path / "tokenizer.json").read_text())
        for added in data["added_tokens"]:
            added["special"] = added["content"] in SPECIAL_TOKENS[:2]
        (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template if chat_template is not None else _reference_chat_template()}, indent=2))
