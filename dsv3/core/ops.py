"""The ops contract: the one seam between the model graph and the hardware.

The model calls only these functions. A backend provides some or all of them; the op table is
resolved once when a model is built (profile pin > backend > reference) and then called directly,
so no plugin machinery runs per token. Shapes use T = tokens in the flat batch, H = heads,
D = hidden size, C = kv_lora_rank (512), R = qk_rope_head_dim (64), E = routed experts, k = experts
per token. Every op must accept tensors on its backend's device and return new tensors unless it
says it writes in place. The reference backend (`dsv3.backends.reference.ops`) is the executable
definition of each op; `dsv3-run check` compares a backend against it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Protocol

import torch

from dsv3.core.weights import QuantWeight


@dataclass(frozen=True)
class ExpertWeights:
    """Routed experts stacked along a leading expert dim: gate/up [E, I, D], down [E, D, I].

    `first_expert` is the global id of local expert 0 (expert parallelism holds a slice); token
    routes to experts outside [first_expert, first_expert + E) contribute nothing on this rank.
    """
    gate: QuantWeight
    up: QuantWeight
    down: QuantWeight
    first_expert: int = 0


@dataclass(frozen=True)
class GateSpec:
    """The noaux_tc router's constants, from config.json."""
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


class OpSpecs(Protocol):
    """Signatures and meaning of every op (documentation; the reference backend implements them)."""

    def embedding(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ids [T] int64, weight [V, D] -> [T, D] in weight's dtype."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, D] -> x * rsqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x + residual; returns (rms_norm(h), h). Fusing the add saves one pass over [T, D]."""

    def rope(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, R], positions [T], cos/sin [P, R/2] float32 -> x rotated in interleaved pairs
        (x[2i], x[2i+1]) by angle index i at each token's position; output in x's dtype."""

    def linear(self, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        """x [T, K] @ dequantize(w)^T -> [T, N] in x's dtype. FP8/INT8 backends may quantise x
        dynamically (1x128 groups for fp8, per token for int8); tolerances in `check` allow for it.
        An FP8 weight with `w.act_scale_fmt == "ue8m0"` (V3.1) fixes that quantisation: x in 1x128
        groups with power-of-two scales (quantize_act with ue8m0), as the reference then does too."""

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, elementwise, [T, I]."""

    def quantize_act(self, x: torch.Tensor, dtype: torch.dtype, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, K] -> (fp8 [T, K], float32 scale [T, ceil(K/128)]), scale = amax/fp8_max per 1x128 group."""

    def write_latent_cache(self, cache: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                           slots: torch.Tensor) -> None:
        """In place: cache [num_blocks, block_size, C + R] viewed as [num_slots, C + R];
        cache[slots[t]] = concat(latent[t], k_rope[t]). latent [T, C] is already normed, k_rope [T, R] rotated.
        A negative slots[t] writes nothing (the padding rows of a captured batch). DeepSeek-V3.2's rows are
        wider (the indexer key follows, see SparseOpSpecs): only their first C + R values are written."""

    def mla_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
        """Naive (expanded) causal attention over ragged sequences. q [Tq, H, Dqk], k [Tk, H, Dqk],
        v [Tk, H, Dv]; sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and k/v rows
        cu_seqlens_k[b]:cu_seqlens_k[b+1], with its queries aligned to the END of its keys (a chunk
        after a cached prefix). Returns [Tq, H, Dv]."""

    def mla_decode(self, q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                   block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """Absorbed attention in latent space over the paged cache. q_latent [T, H, C] (q_nope @ W_UK),
        q_rope [T, H, R], cache [num_blocks, block_size, C + R], block_table [T, max_blocks] int32
        (row t lists the blocks of token t's sequence), context_lens [T] int32 (token t attends to
        its sequence's first context_lens[t] cached tokens). score = (q_latent.latent + q_rope.k_rope)
        * scale; returns softmax(score) @ latent, [T, H, C] in q's dtype."""

    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 spec: GateSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """noaux_tc routing. x [T, D], weight [E, D], bias [E] float32 (e_score_correction_bias).
        Returns (weights [T, k] float32, expert ids [T, k] int64); see DESIGN.md for the rule."""

    def moe_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    experts: ExpertWeights) -> torch.Tensor:
        """sum_j topk_weights[t, j] * down(silu(gate(x_t)) * up(x_t)) over the experts topk_ids[t, j]
        that this rank holds. x [T, D] -> [T, D] in x's dtype. Activation quantisation (x, and the
        down projection's input) follows the expert weights' `act_scale_fmt` as in `linear`."""


class SparseOpSpecs(Protocol):
    """DeepSeek Sparse Attention (DeepSeek-V3.2): the ops only models with a lightning indexer call.

    Such a model's cache rows are wider: [latent C | k_rope R | indexer key Di] per token, in the same
    blocks under the same block table (write_latent_cache fills the first C + R values, write_index_cache
    the last Di). Every token, prefill or decode, attends in latent space (absorbed weights) to the cache
    slots its indexer chose: each query has its own key set, so expanding keys per query (naive prefill)
    would cost more than reading the selected latents once. Hi = indexer heads, Di = their width,
    N = block_table.shape[1] * block_size (the positions a block table covers), K = index_topk.
    Backends that do not provide these fall back to the reference silently: V3 models never call them.
    """

    def write_index_cache(self, cache: torch.Tensor, index_k: torch.Tensor, slots: torch.Tensor) -> None:
        """In place: cache [num_blocks, block_size, W] viewed as [num_slots, W]; the last Di values of row
        slots[t] = index_k[t] ([T, Di], rotated and normed). A negative slot writes nothing."""

    def index_scores(self, q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
        """The lightning indexer's logits. q [T, Hi, Di], weights [T, Hi] float32 (the per-head weights,
        scale included), block_table [T, max_blocks] int32, context_lens [T] int32 -> [T, N] float32 with
        score[t, p] = sum_h weights[t, h] * relu(q[t, h] . k_p) over the indexer key k_p of position p of
        token t's sequence for p < context_lens[t], and -inf for the positions after."""

    def index_topk(self, scores: torch.Tensor, block_table: torch.Tensor, k: int) -> torch.Tensor:
        """scores [T, N] float32 (from index_scores) -> [T, min(k, N)] int64 cache slots of each row's k
        highest finite scores (block_table maps position p to slot table[p // bs] * bs + p % bs), -1 in
        the columns left over when a row has fewer than k finite scores. Order within a row is free."""

    def sparse_mla(self, q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                   scale: float) -> torch.Tensor:
        """Absorbed attention over chosen cache slots. q_latent [T, H, C], q_rope [T, H, R], cache rows
        [latent C | k_rope R | ...], slots [T, K] int64 (-1: none). score = (q_latent . latent + q_rope .
        k_rope) * scale over token t's valid slots; returns softmax(score) @ latent, [T, H, C] in q's dtype."""


# -- what a captured decode step (a CUDA graph) needs of the op table, and how an op says it -----------
# A graph runner replays one fixed launch sequence per batch bucket, padding the batch with rows whose
# slot is -1 and whose context length is 1. So the contract requires, of every backend:
#   - write_latent_cache writes nothing for a negative slot (conformance checks it);
#   - an op that may read device values back to the host (a .tolist(), a shape that depends on the
#     data) is marked @host_syncing; a runner captures no op table that holds one;
#   - an op that multiplies only some weight formats says which with @for_weight_formats(...); the op
#     table is resolved for the model's weight format when the model is built (plugins.manager), so
#     no op decides per call and the graph runner sees the op that will really run.

def host_syncing(fn: Callable) -> Callable:
    """Mark `fn` as reading device values back to the host: correct, but not capturable in a graph."""
    fn.syncs_with_host = True
    return fn


def syncs_with_host(fn: Callable) -> bool:
    return getattr(fn, "syncs_with_host", False)


def for_weight_formats(*formats: str) -> Callable[[Callable], Callable]:
    """Mark a linear / moe_experts implementation as handling only these weight formats."""
    def mark(fn: Callable) -> Callable:
        fn.weight_formats = tuple(formats)
        return fn
    return mark


def handles_weight_format(fn: Callable, weight_format: str) -> bool:
    formats = getattr(fn, "weight_formats", None)
    return formats is None or weight_format in formats


OP_NAMES: tuple[str, ...] = tuple(
    name for name in OpSpecs.__dict__ if not name.startswith("_") and callable(OpSpecs.__dict__[name]))
SPARSE_OP_NAMES: tuple[str, ...] = tuple(
    name for name in SparseOpSpecs.__dict__ if not name.startswith("_") and callable(SparseOpSpecs.__dict__[name]))
ALL_OP_NAMES = OP_NAMES + SPARSE_OP_NAMES


@dataclass(frozen=True)
class Ops:
    """The resolved op table: plain callables, one per op, plus where each came from."""
    embedding: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    linear: Callable
    silu_mul: Callable
    quantize_act: Callable
    write_latent_cache: Callable
    mla_prefill: Callable
    mla_decode: Callable
    moe_gate: Callable
    moe_experts: Callable
    providers: dict  # op name -> "plugin:backend" that supplied it
    # DeepSeek Sparse Attention (SparseOpSpecs); None in a table built for dense-attention models only
    write_index_cache: Callable | None = None
    index_scores: Callable | None = None
    index_topk: Callable | None = None
    sparse_mla: Callable | None = None

    @classmethod
    def from_mapping(cls, impls: dict[str, Callable], providers: dict[str, str]) -> "Ops":
        missing = [n for n in OP_NAMES if n not in impls]
        if missing:
            raise ValueError(f"op table is missing {missing}")
        return cls(**{n: impls[n] for n in ALL_OP_NAMES if n in impls}, providers=dict(providers))


assert set(ALL_OP_NAMES) == {f.name for f in fields(Ops)} - {"providers"}, "Ops and OpSpecs disagree"
