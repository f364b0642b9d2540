"""Memory per rank for a layout: what `dsv3-run plan` prints.

weights      exact: the model is built on the meta device with the layout's Mesh, so each rank's
             parameters (its heads, vocab rows, experts, FP8 scales) are counted as loading makes them.
             Rank 0 is the largest (it holds ceil(V/tp) vocab rows; expert counts are equal). The MTP
             layer's embedding and head are counted once when shared: the loader shares them with the
             main model's when the checkpoint's copies are equal bit for bit (official checkpoints);
             both are resident only while loading, before the latent cache is allocated.
latent cache exact: (layers + MTP) x (kv_lora_rank + qk_rope_head_dim [+ index_head_dim: V3.2's indexer
             keys share the latent cache's rows]) x cache dtype bytes per token,
             on every rank: MLA caches one latent per token shared by all heads, so tensor
             parallelism cannot split it. With dp = 1 the tensor-parallel groups are replicas: every
             rank holds every sequence's cache, and the system's distinct cache is one rank's. With
             data-parallel attention (dp > 1, dp x tp = W) each group serves its own sequences from
             its own cache: the system holds dp ranks' worth of distinct tokens (distinct_tokens).
activations  an estimate for one step of max_batch_tokens tokens (per group under dp > 1): the residual
             stream, the largest of attention (naive prefill, fused attention kernel: scores not
             materialised), MoE (uniform routing, dispatch buffers; under dp > 1 every group's tokens
             meet at each rank's experts, so dp x max_batch_tokens of them) and dense MLP, and the
             logits of up to LOGIT_ROWS rows.
reserve      a fixed allowance for the CUDA/HIP context, collective-library buffers and allocator slack.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from dsv3.core.config import ModelConfig
from dsv3.core.layout import Mesh
from dsv3.parallel.sharding import layout_problems

GiB = 2**30
RESERVE = 2 * GiB
LOGIT_ROWS = 512       # rows needing logits in one step: last prompt tokens, decode and draft tokens
MAX_GPUS = 256


@dataclass(frozen=True)
class RankMemory:
    world: int
    tp: int
    ep: int
    weights: int            # bytes on the largest rank
    cache_per_token: int    # bytes per cached token, on every rank
    cache_tokens: int
    activations: int
    reserve: int = RESERVE
    absorbed: int = 0       # the absorbed MLA weights (W_UK, W_UV per layer) made from kv_b after loading
    mtp_copies: int = 0     # bytes of the MTP layer's embedding + head on this rank (not in `weights` if shared)
    shared: bool = False    # whether `weights` counts them once, shared with the main model's
    dp: int = 1             # data-parallel attention groups: each holds its own sequences' cache

    @property
    def cache(self) -> int:
        return self.cache_per_token * self.cache_tokens

    @property
    def total(self) -> int:
        return self.weights + self.absorbed + self.cache + self.activations + self.reserve

    def tokens_that_fit(self, gpu_bytes: int) -> int:
        """Latent-cache tokens the rest of the GPU would hold (0 if weights and activations do not fit)."""
        return max(gpu_bytes - self.weights - self.absorbed - self.activations - self.reserve, 0) // self.cache_per_token

    def distinct_tokens(self, gpu_bytes: int, block_size: int = 1) -> int:
        """Latent-cache tokens the whole system holds, each counted once: one rank's (in whole cache
        blocks) times dp. A group's tp ranks hold the same latents (tensor parallelism splits heads,
        not the latent), and with dp = 1 all groups are replicas of one another."""
        return self.tokens_that_fit(gpu_bytes) // block_size * block_size * self.dp


def _meta_model(cfg: ModelConfig, weight_format: str, dtype: torch.dtype, with_mtp: bool, mesh: Mesh):
    from dsv3.backends.reference.ops import OPS
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    with torch.device("meta"):
        return DeepseekV3(cfg, Ops.from_mapping(OPS, {}), weight_format, dtype, with_mtp=with_mtp, mesh=mesh)


def absorbed_bytes(cfg: ModelConfig, dtype: torch.dtype, with_mtp: bool, mesh: Mesh) -> int:
    """Bytes of what this rank makes from its loaded weights: the absorbed MLA weights W_UK, W_UV
    (H/tp x (nope + v) x C per layer in the activation dtype; ~33.5 MB per layer for V3 at tp 1)."""
    return sum(b.numel() * b.element_size() for b in _meta_model(cfg, "dense", dtype, with_mtp, mesh).buffers())


def weight_bytes(cfg: ModelConfig, weight_format: str, dtype: torch.dtype, with_mtp: bool, mesh: Mesh) -> int:
    """Bytes of this rank's parameters (weights, FP8/INT8 scales, norms, router) as loaded."""
    return sum(p.numel() * p.element_size() for p in _meta_model(cfg, weight_format, dtype, with_mtp, mesh).parameters())


def mtp_copy_bytes(cfg: ModelConfig, weight_format: str, dtype: torch.dtype, mesh: Mesh) -> int:
    """Bytes of this rank's MTP embedding and head (dsv3.core.loader.mtp_copies): what sharing saves."""
    from dsv3.core.loader import mtp_copies
    model = _meta_model(cfg, weight_format, dtype, True, mesh)
    return sum(p.numel() * p.element_size() for name, _ in mtp_copies(cfg)
               for p in model.get_submodule(name).parameters())


def parameter_count(cfg: ModelConfig, with_mtp: bool) -> int:
    return sum(p.numel() for p in _meta_model(cfg, "dense", torch.bfloat16, with_mtp, Mesh()).parameters())


def cache_bytes_per_token(cfg: ModelConfig, with_mtp: bool, cache_dtype: torch.dtype) -> int:
    layers = cfg.num_hidden_layers + int(with_mtp)
    return layers * cfg.cache_dim * torch.empty(0, dtype=cache_dtype).element_size()   # V3.2: + the indexer key


def activation_bytes(cfg: ModelConfig, mesh: Mesh, dtype: torch.dtype, tokens: int) -> int:
    a, t, d = torch.empty(0, dtype=dtype).element_size(), tokens, cfg.hidden_size
    heads = cfg.num_attention_heads // mesh.tp
    stream = 4 * t * d * a                                   # x, residual, normed x, layer output
    attention = t * a * ((cfg.q_lora_rank or 0) + cfg.latent_dim         # q_a, kv_a outputs
                         + 2 * heads * cfg.qk_head_dim                    # q, expanded k
                         + heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b output
                         + 2 * heads * cfg.v_head_dim)                    # v, attention output
    if cfg.sparse_attention:   # V3.2: absorbed queries and outputs in latent space, the indexer, chosen slots
        from dsv3.core.model import SCORE_ROWS
        attention = (t * a * ((cfg.q_lora_rank or 0) + cfg.latent_dim + heads * (cfg.qk_head_dim + 2 * cfg.kv_lora_rank
                                                                                 + 2 * cfg.v_head_dim)
                              + cfg.index_n_heads * cfg.index_head_dim)
                     + t * cfg.index_topk * 8                            # chosen slots, int64
                     + min(t, SCORE_ROWS) * cfg.max_position_embeddings * 4)   # one run of scores, longest context
    exchanged = t * mesh.dp          # data-parallel attention: every group's tokens meet at this rank's experts
    routes = math.ceil(exchanged * cfg.num_experts_per_tok / mesh.ep)       # (token, expert) pairs held here
    inter = cfg.moe_intermediate_size // mesh.moe_tp
    moe = (routes * (3 * inter + d) * a                      # gathered x, gate, up, silu*up per route
           + exchanged * d * 4                               # float32 accumulation of the expert outputs
           + 3 * exchanged * d * a                           # dispatch, receive and combine buffers
           + exchanged * cfg.n_routed_experts * 4)           # router scores
    mlp = 3 * t * (cfg.intermediate_size // mesh.tp) * a
    rows = min(t, LOGIT_ROWS)
    logits = rows * cfg.vocab_size * 4 + rows * -(-cfg.vocab_size // mesh.tp) * 4   # gathered + local, float32
    return stream + max(attention, moe, mlp) + logits


def default_layout(cfg: ModelConfig, world: int, checkpoint_format: str) -> tuple[int, int] | None:
    """(tp, ep) for `world` GPUs: the widest split that the model allows (whole experts per rank
    when possible), attention replicated where heads or FP8 blocks stop it splitting further."""
    divisors = [n for n in range(world, 0, -1) if world % n == 0]
    for ep in divisors:
        for tp in divisors:
            if not layout_problems(cfg, world, tp, ep, checkpoint_format):
                return tp, ep
    return None


def candidates(tp: int, ep: int) -> list[int]:
    """GPU counts to try: powers of two up to MAX_GPUS (multiples of a fixed tp and ep)."""
    step = math.lcm(tp, ep)
    return [n for n in (2**i for i in range(int(math.log2(MAX_GPUS)) + 1)) if n % step == 0] or [step]


def dp_problems(cfg: ModelConfig, world: int, tp: int, ep: int, dp: int, checkpoint_format: str) -> list[str]:
    """Why dp groups of tp ranks (experts over ep) cannot run this model on `world` ranks (empty if they can)."""
    if dp > 1 and world % dp:
        return [f"parallel.dp = {dp} does not divide the world size {world}"]
    return layout_problems(cfg, world, tp, ep, checkpoint_format, dp)


def rank_memory(cfg: ModelConfig, world: int, tp: int, ep: int, weight_format: str, dtype: torch.dtype,
                cache_dtype: torch.dtype, cache_tokens: int, batch_tokens: int, with_mtp: bool,
                shared: bool = False, dp: int = 1) -> RankMemory:
    """shared: the MTP embedding and head will share the main model's storage (counted once).
    dp: data-parallel attention groups (dp x tp = world; the weights depend on tp and ep only, the
    activations on dp too, and each rank's cache serves its own group's sequences)."""
    mesh = Mesh(world, 0, tp, ep, dp=dp)    # layout only: no process group
    copies = mtp_copy_bytes(cfg, weight_format, dtype, mesh) if with_mtp else 0
    shared = shared and with_mtp
    return RankMemory(world, tp, ep, weight_bytes(cfg, weight_format, dtype, with_mtp, mesh) - copies * shared,
                      cache_bytes_per_token(cfg, with_mtp, cache_dtype), cache_tokens,
                      activation_bytes(cfg, mesh, dtype, batch_tokens),
                      absorbed=absorbed_bytes(cfg, dtype, with_mtp, mesh), mtp_copies=copies, shared=shared, dp=dp)


@dataclass(frozen=True)
class LayoutOption:
    """One row of `dsv3-run plan`'s comparison of layouts on a fixed number of GPUs."""
    dp: int
    tp: int
    ep: int
    memory: RankMemory | None       # None when the layout cannot run this model (see problems)
    problems: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.dp == 1:
            return f"tp={self.tp}, ep={self.ep} (dp=1)"
        if self.tp == 1:
            return f"dp={self.dp}, ep={self.ep}, tp=1"
        return f"dp={self.dp} x tp={self.tp}, ep={self.ep}"

    def batch(self, gpu_bytes: int, context: int, block_size: int, max_batch_tokens: int) -> int:
        """The most sequences of `context` tokens the whole system decodes at once: per group what one
        rank's cache holds (every rank of a group holds every one of its sequences), at most
        max_batch_tokens per step, times dp (dp = 1: one group's worth, the others are replicas)."""
        per_rank = self.memory.distinct_tokens(gpu_bytes, block_size) // self.dp
        return min(per_rank // (-(-context // block_size) * block_size), max_batch_tokens) * self.dp


def compare_layouts(cfg: ModelConfig, world: int, weight_format: str, dtype: torch.dtype, cache_dtype: torch.dtype,
                    batch_tokens: int, with_mtp: bool, checkpoint_format: str, shared: bool = False,
                    base: tuple[int, int] | None = None, ep: int | None = None) -> list[LayoutOption]:
    """The ways to run `world` GPUs: base (tp, ep) with dp = 1 (default: default_layout), then
    dp = d groups of tp = world / d ranks for every divisor d > 1, the routed experts over `ep`
    (default: world, whole experts per rank). Layouts the model cannot take carry their problems."""
    base = base or default_layout(cfg, world, checkpoint_format)
    layouts = ([(1, *base)] if base else []) + [
        (d, world // d, ep or world) for d in range(2, world + 1) if world % d == 0]
    options = []
    for dp, tp, ep_ in layouts:
        problems = dp_problems(cfg, world, tp, ep_, dp, checkpoint_format)
        options.append(LayoutOption(dp, tp, ep_, None if problems else rank_memory(
            cfg, world, tp, ep_, weight_format, dtype, cache_dtype, 0, batch_tokens, with_mtp, shared, dp),
            tuple(problems)))
    return options


# -- before loading: refuse what this device cannot hold, naming the key that makes it large ----------

# (parameter-name pattern, what it is, the config.json keys that size it), checked in order
_PARTS = ((re.compile(r"\.mlp\.experts\."), "the routed experts", ("n_routed_experts", "moe_intermediate_size")),
          (re.compile(r"\.mlp\.shared_experts\."), "the shared experts", ("n_shared_experts", "moe_intermediate_size")),
          (re.compile(r"embed_tokens|lm_head|shared_head\.head"), "the embeddings and output heads", ("vocab_size",)),
          (re.compile(r"\.self_attn\."), "attention", ("num_attention_heads", "kv_lora_rank")),
          (re.compile(r"\.mlp\."), "the dense MLPs", ("intermediate_size",)),
          (re.compile(r""), "norms and the rest", ("hidden_size",)))


def available_bytes(device: torch.device) -> int | None:
    """Memory a model could still take on `device`: the host's MemAvailable for cpu, free device memory
    for a GPU (torch.<type>.mem_get_info); None when unknown (meta, or no such query)."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            try:
                return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                return None
    get = getattr(getattr(torch, device.type, None), "mem_get_info", None)
    if get is None:
        return None
    try:
        return int(get(device)[0])
    except Exception:  # noqa: BLE001 - a backend that cannot answer: loading finds out
        return None


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check_fits(cfg: ModelConfig, profile, device: torch.device, weight_format: str, with_mtp: bool,
               mesh: Mesh | None = None, source: str = "config.json", shared: bool = False) -> None:
    """Refuse, before anything is allocated, weights + latent cache + one step's activations that
    `device` cannot hold (this rank's share under `mesh`): a ConfigError naming the config.json keys
    of the largest part of the weights, or a ProfileError naming kv_cache.max_tokens or
    max_batch_tokens, with what would fit. shared: the MTP embedding and head will share the main
    model's storage once loaded (both copies are resident while loading, before the cache exists)."""
    from dsv3.core.errors import ConfigError, ProfileError
    available = available_bytes(device)
    if available is None:
        return
    mesh = mesh or Mesh()
    layout = Mesh(mesh.world, mesh.rank, mesh.tp, mesh.ep, dp=mesh.dp)   # the layout only: no process group
    dtype = getattr(torch, profile.dtype)
    kv = profile.kv_cache
    cache_dtype = dtype if kv.dtype == "auto" else getattr(torch, kv.dtype)
    parts = {label: 0 for _, label, _ in _PARTS}
    model = _meta_model(cfg, weight_format, dtype, with_mtp, layout)
    for name, p in [*model.named_parameters(), *model.named_buffers()]:   # buffers: the absorbed MLA weights
        label = next(label for pattern, label, _ in _PARTS if pattern.search(name))
        parts[label] += p.numel() * p.element_size()
    rope = 2 * cfg.max_position_embeddings * (cfg.qk_rope_head_dim // 2) * 4   # cos, sin float32 tables
    saved = mtp_copy_bytes(cfg, weight_format, dtype, layout) if shared and with_mtp else 0
    parts["the embeddings and output heads"] -= saved
    weights = sum(parts.values()) + rope
    per_token = cache_bytes_per_token(cfg, with_mtp, cache_dtype)
    cache = per_token * -(-kv.max_tokens // kv.block_size) * kv.block_size
    activations = activation_bytes(cfg, layout, dtype, profile.max_batch_tokens)
    reserve = 0 if device.type == "cpu" else RESERVE
    need = max(weights + cache + activations, weights + saved) + reserve   # running, or loading
    if need <= available:
        return
    where = (f"on {device}{f' (rank {mesh.rank} of {mesh.world})' if mesh.world > 1 else ''}, which has "
             f"{_gib(available)} available")
    summary = (f"weights {_gib(weights)} + latent cache {_gib(cache)} + activations {_gib(activations)}"
               + (f" + reserve {_gib(reserve)}" if reserve else ""))
    room = available - weights - activations - reserve
    if cache >= max(weights, activations) and room > 0:
        fit = room // per_token
        raise ProfileError(f"{profile.source}: kv_cache.max_tokens = {kv.max_tokens} needs {_gib(cache)} of latent "
                           f"cache ({per_token} bytes per token) {where} ({summary}); at most {fit} tokens fit: "
                           f"lower kv_cache.max_tokens (--max-cache-tokens)"
                           + ("" if cache_dtype.itemsize == 1 else ", or use a smaller kv_cache.dtype (bfloat16, "
                              "or float8_e4m3fn where the backend supports it)"))
    if activations >= max(weights, cache) and available > weights + cache + reserve:
        raise ProfileError(f"{profile.source}: max_batch_tokens = {profile.max_batch_tokens} needs about "
                           f"{_gib(activations)} of activations per step {where} ({summary}); lower "
                           f"max_batch_tokens")
    label, size = max(parts.items(), key=lambda kv_: kv_[1])
    keys = next(k for _, lab, k in _PARTS if lab == label)
    if rope > size:
        label, size, keys = "the RoPE tables", rope, ("max_position_embeddings",)
    named = ", ".join(f"{k} = {getattr(cfg, k)}" for k in keys)
    raise ConfigError(f"{source}: this model needs {_gib(need)} {where} ({summary}); the largest part is "
                      f"{label} ({named}, {cfg.num_hidden_layers} layers: {_gib(size)} in {weight_format}). Run it "
                      f"on a device with more memory or split it over GPUs (`dsv3-run plan` says how many), use "
                      f"a smaller weight_format, or check config.json")
