"""The sharding plan: is a layout possible for this model, and which part of each tensor a rank reads.

FP8 block scales: a tensor split across ranks is split on the 128x128 scale grid, so each rank reads
its weight rows/columns and exactly the scale blocks that cover them, and runs them unchanged (no
dequantise-requantise, no full tensor ever read). A layout whose per-rank slice does not fall on the
grid is refused before anything is loaded, with the sizes that work; DeepSeek-V3 splits cleanly
for tp up to 64 (attention), 16 (dense MLP, shared expert) and W/ep up to 16 (expert rows).
"""
from __future__ import annotations

import re
from typing import Callable

from dsv3.core.config import ModelConfig
from dsv3.core.errors import ProfileError
from dsv3.core.layout import Mesh
from dsv3.core.loader import parse_expert_tensor_name
from dsv3.core.weights import BLOCK

BLOCK_FORMATS = ("fp8-block", "fp8-fnuz")


def dp_layout(world: int, dp: int, tp: int = 1, ep: int = 1) -> tuple[int, int]:
    """(tp, ep) that parallel.dp = dp runs with on `world` ranks: tp not set (1) becomes world / dp,
    ep not set (1) becomes world (whole experts per rank). dsv3.parallel.launch.setup and the planner
    both take them from here."""
    if tp == 1 and dp > 0 and world % dp == 0:
        tp = world // dp
    return tp, (world if ep == 1 else ep)


def layout_problems(cfg: ModelConfig, world: int, tp: int, ep: int, checkpoint_format: str = "dense",
                    dp: int = 1) -> list[str]:
    """Why tp x ep (x dp) cannot run this model on `world` ranks (empty if it can)."""
    problems = []
    if dp > 1 and dp * tp != world:
        problems.append(f"parallel.dp = {dp} x parallel.tp = {tp} must equal the world size {world} (each of the dp "
                        f"attention groups is tp ranks)")
    if world % tp:
        problems.append(f"parallel.tp = {tp} does not divide the world size {world}")
    if world % ep:
        problems.append(f"parallel.ep = {ep} does not divide the world size {world}")
    if problems:
        return problems
    moe_tp = world // ep
    h = cfg.num_attention_heads
    has_dense = cfg.first_k_dense_replace > 0
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    shared = cfg.moe_intermediate_size * cfg.n_shared_experts
    # (profile key, what is split, its length, the number of ways it is split). The vocabulary may
    # split unevenly: ceil(V/tp) rows per rank, fewer on the last.
    splits = [("parallel.tp", f"num_attention_heads = {h}", h, tp)]
    if has_dense:
        splits.append(("parallel.tp", f"intermediate_size = {cfg.intermediate_size}", cfg.intermediate_size, tp))
    if has_moe:
        splits += [("parallel.ep", f"n_routed_experts = {cfg.n_routed_experts}", cfg.n_routed_experts, ep),
                   ("parallel.ep", f"moe_intermediate_size = {cfg.moe_intermediate_size} (each routed expert is "
                    f"split world/ep = {moe_tp} ways)", cfg.moe_intermediate_size, moe_tp)]
        if shared:
            splits.append(("parallel.tp", f"the shared experts' intermediate size {shared}", shared, tp))
    for key, what, n, ways in splits:
        if n % ways:
            problems.append(f"{key}: {what} does not split {ways} ways")
    if problems or checkpoint_format not in BLOCK_FORMATS:
        return problems
    # FP8 checkpoints: every per-rank slice must start and end on the 128-element scale grid
    heads = h // tp
    grid = []
    if tp > 1:
        grid += [("q_b_proj rows", heads * cfg.qk_head_dim, "parallel.tp"),
                 ("kv_b_proj rows", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), "parallel.tp"),
                 ("o_proj columns", heads * cfg.v_head_dim, "parallel.tp")]
        if has_dense:
            grid.append(("dense MLP rows", cfg.intermediate_size // tp, "parallel.tp"))
        if has_moe and shared:
            grid.append(("shared expert rows", shared // tp, "parallel.tp"))
    convert = "convert the checkpoint to bf16 (`dsv3-run convert SRC DST --to bf16`)"
    for what, per_rank, key in grid:
        if per_rank % BLOCK:
            problems.append(f"{key}: each rank would hold {per_rank} {what}, which does not follow the "
                            f"{BLOCK}x{BLOCK} FP8 scale blocks; split fewer ways, or {convert}")
    expert_rows = cfg.moe_intermediate_size // moe_tp
    if has_moe and moe_tp > 1 and expert_rows % BLOCK:
        # ep < world: what is split is each expert (world / ep ways), not the set of experts
        whole = (f"set ep = {world} (--ep {world}) to keep every expert whole on one rank, or "
                 if cfg.n_routed_experts % world == 0 else "")
        problems.append(f"parallel.ep = {ep} on {world} ranks splits each routed expert world/ep = {moe_tp} ways, "
                        f"so each rank would hold {expert_rows} of its {cfg.moe_intermediate_size} rows, which "
                        f"does not follow the {BLOCK}x{BLOCK} FP8 scale blocks; {whole}{convert}")
    return problems


def check_layout(cfg: ModelConfig, mesh: Mesh, checkpoint_format: str, source: str) -> None:
    """Raise a ProfileError naming every reason `mesh` cannot hold this model."""
    problems = layout_problems(cfg, mesh.world, mesh.tp, mesh.ep, checkpoint_format, mesh.dp)
    if problems:
        dp = f", dp: {mesh.dp}" if mesh.dp > 1 else ""
        raise ProfileError(f"{source}: parallel = {{tp: {mesh.tp}, ep: {mesh.ep}{dp}}} on {mesh.world} ranks cannot "
                           f"run this model: " + "; ".join(problems))


_ATTN = re.compile(r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)\.weight$")
_MLP = re.compile(r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head|shared_head\.head)\.weight$")


def slicer(cfg: ModelConfig, mesh: Mesh) -> Callable[[str, tuple[int, ...]], tuple[slice, ...] | None]:
    """The loader's per-rank slicer (dsv3.core.loader.load_weights): checkpoint tensor name and full
    shape -> the rows/columns this rank keeps, or None for all of it. Scales follow their weight."""
    h0, h1 = mesh.tp_range(cfg.num_attention_heads)
    per_head = {"q_proj": cfg.qk_head_dim, "q_b_proj": cfg.qk_head_dim,
                "kv_b_proj": cfg.qk_nope_head_dim + cfg.v_head_dim, "o_proj": cfg.v_head_dim}

    def rows_or_cols(proj: str, lo: int, hi: int) -> tuple[slice, ...]:
        # gate/up (and q_b, kv_b) are column parallel: split output rows; down / o_proj split input columns
        return (slice(None), slice(lo, hi)) if proj in ("down_proj", "o_proj") else (slice(lo, hi),)

    def keep(name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        if m := _ATTN.search(name):
            if mesh.tp == 1:
                return None
            n = per_head[m.group(1)]
            return rows_or_cols(m.group(1), h0 * n, h1 * n)
        if (expert := parse_expert_tensor_name(name)) and expert[3] == "weight":
            if mesh.moe_tp == 1:
                return None
            return rows_or_cols(expert[2], *mesh.expert_inter_range(cfg.moe_intermediate_size))
        if m := _MLP.search(name):
            if mesh.tp == 1:
                return None
            full = shape[1] if m.group(2) == "down_proj" else shape[0]
            return rows_or_cols(m.group(2), *mesh.tp_range(full))
        if _VOCAB.search(name) and mesh.tp > 1:
            return (slice(*mesh.vocab_range(shape[0])),)
        return None

    return keep
