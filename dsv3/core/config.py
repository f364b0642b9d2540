"""ModelConfig: what the checkpoint's config.json says the model is.

Reads HF config.json in transformers 4.x style (`rope_scaling` + top-level `rope_theta`,
`torch_dtype`) and 5.x style (`rope_parameters`, `dtype`). Unknown HF keys are ignored; values the
model cannot run are a ConfigError naming the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from dsv3.core.errors import ConfigError, brief, read_document

# kimi_k2: Moonshot's Kimi-K2 names its own model_type for DeepSeek-V3's architecture (DeepseekV3ForCausalLM)
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "kimi_k2")
# DeepSeek-V3.2's lightning indexer when its config.json leaves them out (transformers' defaults)
INDEX_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
MAX_CONFIG_BYTES = 16 * 2**20   # a config.json is a few KB
# Upper bounds far above any released model (DeepSeek-V3: 129280 / 7168 / 61 layers / 256 experts / 163840
# positions), low enough that a typo fails here, naming the key, instead of in an allocation.
LIMITS = {"vocab_size": 2**24, "hidden_size": 2**17, "intermediate_size": 2**20, "moe_intermediate_size": 2**20,
          "num_hidden_layers": 1024, "num_attention_heads": 2**12, "kv_lora_rank": 2**14, "q_lora_rank": 2**16,
          "qk_nope_head_dim": 2**12, "qk_rope_head_dim": 2**12, "v_head_dim": 2**12, "n_routed_experts": 2**14,
          "n_shared_experts": 2**10, "max_position_embeddings": 2**24, "index_n_heads": 2**12, "index_head_dim": 2**12,
          "index_topk": 2**24}


@dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def attention_factor(self) -> float:
        """Scale on cos/sin (transformers' and DeepSeek's HF code): 1.0 for V3, where mscale == mscale_all_dim."""
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class QuantConfig:
    """quantization_config of an FP8 checkpoint."""
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None      # "ue8m0" in V3.1: power-of-two activation scales
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quantization: QuantConfig | None = None
    # DeepSeek-V3.2 (model_type deepseek_v32): DeepSeek Sparse Attention. 0 = dense attention (V3).
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: normed latent + shared rope key (512 + 64 in V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            scale *= _yarn_mscale(y.factor, y.mscale_all_dim) ** 2
        return scale

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2: a lightning indexer per layer picks the index_topk tokens each query attends to."""
        return self.index_topk > 0

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: the latent and rope key, then (V3.2) the indexer's key."""
        return self.latent_dim + self.index_head_dim

    @property
    def act_scale_fmt(self) -> str | None:
        """"ue8m0" when the checkpoint's FP8 activation scales are powers of two (V3.1), else None."""
        return self.quantization.scale_fmt if self.quantization is not None else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; a model directory needs the HF config.json "
                              f"next to its safetensors files")
        raw = read_document(path, ConfigError, "a model config", max_bytes=MAX_CONFIG_BYTES)
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        def bad(key, value, allowed):
            return ConfigError(f"{source}: {key} = {brief(value)} is not supported; {allowed}")

        def number(key, value, minimum=None, above=None, integer=False):
            """value as a finite float (int if `integer`), at least `minimum` / above `above`."""
            kind = int if integer else (int, float)
            ok = isinstance(value, kind) and not isinstance(value, bool) and (isinstance(value, int)
                                                                              or math.isfinite(value))
            if not ok:
                raise bad(key, value, "expected an integer" if integer else "expected a number")
            if minimum is not None and value < minimum:
                raise bad(key, value, f"must be >= {minimum}")
            if above is not None and value <= above:
                raise bad(key, value, f"must be > {above}")
            return value if integer else float(value)

        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", model_type, f"dsv3 runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        for key, allowed in (("scoring_func", ("sigmoid",)), ("topk_method", ("noaux_tc",)),
                             ("hidden_act", ("silu",))):
            if key in raw and raw[key] not in allowed:
                raise bad(key, raw[key], f"allowed: {', '.join(allowed)}")
        if raw.get("attention_bias"):
            raise bad("attention_bias", raw["attention_bias"], "DeepSeek-V3 projections have no bias")
        if raw.get("moe_layer_freq", 1) != 1:
            raise bad("moe_layer_freq", raw["moe_layer_freq"], "only 1 (every layer after the dense ones)")

        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and k not in
                  ("rope_scaling", "quantization", "eos_token_ids", "torch_dtype", "rope_theta")}
        if raw.get("q_lora_rank") is None:
            values["q_lora_rank"] = None
        for key, default in INDEX_DEFAULTS.items():   # the indexer exists only in V3.2
            if model_type == "deepseek_v32":
                values.setdefault(key, default)
            else:
                values.pop(key, None)
        values["torch_dtype"] = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        eos = raw.get("eos_token_id", 1)
        eos = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
        for token in eos:
            number("eos_token_id", token, minimum=0, integer=True)
        values["eos_token_ids"] = tuple(eos)
        if raw.get("bos_token_id") is not None:
            number("bos_token_id", raw["bos_token_id"], minimum=0, integer=True)

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise bad("rope_scaling", rope, "expected an object")
        values["rope_theta"] = number("rope_theta", rope.get("rope_theta", raw.get("rope_theta", 10000.0)), above=1)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "yarn":
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in rope]
            if missing:
                raise ConfigError(f"{source}: rope_scaling of type yarn needs {missing[0]!r}")

            def optional(key):
                return None if rope.get(key) is None else number(f"rope_scaling.{key}", rope[key], minimum=0)
            values["rope_scaling"] = YarnConfig(
                factor=number("rope_scaling.factor", rope["factor"], minimum=1),   # YaRN stretches the context
                original_max_position_embeddings=number("rope_scaling.original_max_position_embeddings",
                                                        rope["original_max_position_embeddings"], minimum=1,
                                                        integer=True),
                beta_fast=number("rope_scaling.beta_fast", rope.get("beta_fast") or 32, above=0),
                beta_slow=number("rope_scaling.beta_slow", rope.get("beta_slow") or 1, above=0),
                mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"))
        elif rope_type not in ("default", None):
            raise bad("rope_scaling.type", rope_type, "allowed: yarn, or none")

        q = raw.get("quantization_config")
        if q is not None:
            if not isinstance(q, dict):
                raise bad("quantization_config", q, "expected an object such as {\"quant_method\": \"fp8\", ...}")
            if q.get("quant_method") != "fp8":
                raise bad("quantization_config.quant_method", q.get("quant_method"),
                          "dsv3 reads fp8 block-quantised checkpoints (others: convert with `dsv3-run convert`)")
            block = q.get("weight_block_size", (128, 128))
            if not isinstance(block, (list, tuple)) or tuple(block) != (128, 128):
                raise bad("quantization_config.weight_block_size", block, "only [128, 128]")
            block = tuple(block)
            if q.get("scale_fmt") not in (None, "ue8m0"):
                raise bad("quantization_config.scale_fmt", q.get("scale_fmt"), "allowed: ue8m0, or absent")
            for key in ("fmt", "activation_scheme"):
                if not isinstance(q.get(key, ""), str):
                    raise bad(f"quantization_config.{key}", q[key], "expected a string")
            values["quantization"] = QuantConfig(fmt=q.get("fmt", "e4m3"), weight_block_size=block,
                                                 scale_fmt=q.get("scale_fmt"),
                                                 activation_scheme=q.get("activation_scheme", "dynamic"))
        try:
            cfg = cls(**values)
        except TypeError as e:
            missing = str(e).split("argument")[-1].strip(": ")
            raise ConfigError(f"{source}: missing required key(s) {missing}") from e
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        def need(cond, key, msg):
            if not cond:
                raise ConfigError(f"{source}: {key} = {brief(getattr(self, key))}: {msg}")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, key)
            need(is_int(value) and value > 0, key, "must be a positive integer")
        for key in ("n_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "num_nextn_predict_layers"):
            need(is_int(getattr(self, key)), key, "must be an integer")
        need(self.q_lora_rank is None or (is_int(self.q_lora_rank) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or null")
        for key, limit in LIMITS.items():
            value = getattr(self, key)
            need(value is None or value <= limit, key, f"is beyond any DeepSeek-V3-family model (at most {limit} "
                 f"here); check config.json")
        for key in ("rms_norm_eps", "routed_scaling_factor"):
            value = getattr(self, key)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
                 key, "must be a positive number")
        need(self.rms_norm_eps < 1, "rms_norm_eps", "must be < 1 (DeepSeek-V3: 1e-06)")
        for key in ("norm_topk_prob", "tie_word_embeddings"):
            need(isinstance(getattr(self, key), bool), key, "must be true or false")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
             f"must divide n_routed_experts ({self.n_routed_experts})")
        need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        need(1 <= self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
             f"must be in 1..topk_group * experts per group ({self.topk_group * per_group})")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             "must be in 0..num_hidden_layers")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             "dsv3 runs 0 or 1 MTP modules (DeepSeek-V3 ships 1)")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        if self.sparse_attention or self.index_n_heads or self.index_head_dim:
            for key in INDEX_DEFAULTS:
                value = getattr(self, key)
                need(is_int(value) and value > 0, key, "must be a positive integer (DeepSeek-V3.2's indexer)")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
                 f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the indexer rotates its first dims")
            need(self.q_lora_rank is not None, "q_lora_rank",
                 "must be set for DeepSeek-V3.2: its indexer reads the query latent")
        need(self.torch_dtype in ("bfloat16", "float16", "float32"), "torch_dtype",
             "allowed: bfloat16, float16, float32")
