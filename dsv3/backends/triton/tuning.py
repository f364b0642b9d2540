"""Per-vendor tuning tables: the only place NVIDIA and AMD differ besides the FP8 dtype.

A `Target` names the hardware a table is for: "cuda" (Hopper, sm_90), "gfx942" (MI300X/MI325X),
"gfx950" (MI350X/MI355X). Each function maps a problem shape to launch parameters. AMD entries
add the ROCm compiler knobs: `waves_per_eu` (occupancy hint), `matrix_instr_nonkdim` (16 -> the
16x16 MFMA, better for FP8 than 32x32 at these tile sizes) and `kpack` (2 packs two K-steps per
MFMA on gfx942; gfx950 takes only 1). AMD numbers follow the shapes AMD's own Triton GEMM tables
use (num_stages 2: the AMD stream pipeliner's depth); they are compiled in CI but never timed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

AMD_ARCHS = ("gfx942", "gfx950")


BATCH_INVARIANT_ENV = "DSV3_BATCH_INVARIANT"


def batch_invariant_requested() -> bool:
    """DSV3_BATCH_INVARIANT=1: build the op table with Target.batch_invariant (read once, at build)."""
    import os
    return os.environ.get(BATCH_INVARIANT_ENV, "") == "1"


@dataclass(frozen=True)
class Target:
    name: str                   # "cuda", "gfx942", "gfx950"
    fp8_dtype: torch.dtype      # float8_e4m3fn (Hopper, gfx950) or float8_e4m3fnuz (gfx942)
    num_sms: int = 132          # streaming multiprocessors / compute units, for split decisions
    # Batch-invariant kernels (DSV3_BATCH_INVARIANT=1): every config below is the one a single row
    # gets, whatever the batch, so a row's arithmetic (tiles, split-K, KV splits, router splits) and
    # hence its rounding never depend on what else is batched with it. Greedy output is then the same
    # alone or in any batch, and MTP verification reproduces plain decoding exactly; large batches
    # and prefill run slower (no cuBLAS, small tiles).
    batch_invariant: bool = False
    # Programmatic dependent launch for the kernels that support it (dsv3.backends.triton.pdl): sm_90+ only,
    # opt-in (DSV3_PDL=1: measured no faster)
    pdl: bool = False

    @property
    def is_amd(self) -> bool:
        return self.name in AMD_ARCHS

    def amd_knobs(self, waves_per_eu: int = 2, nonkdim: int = 16) -> dict:
        if not self.is_amd:
            return {}
        return {"waves_per_eu": waves_per_eu, "matrix_instr_nonkdim": nonkdim,
                "kpack": 2 if self.name == "gfx942" else 1}


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    extra: dict = field(default_factory=dict)


def _split_for(target: Target, tiles: int, k_steps: int, waves: float, min_steps: int) -> int:
    """Split K until the grid covers `waves` x the SMs, keeping >= min_steps K steps per program."""
    want = triton.cdiv(int(target.num_sms * waves), tiles)
    return max(1, min(want, k_steps // min_steps))


def gemm_config(target: Target, m: int, n: int, k: int) -> GemmConfig:
    if target.batch_invariant:
        m = 1
    k_steps = triton.cdiv(k, 128)
    if target.is_amd:
        stages, knobs = 2, target.amd_knobs()
        if m <= 16:
            bn = 64
            split = _split_for(target, triton.cdiv(n, bn), k_steps, 2, 4)
            return GemmConfig(16, bn, split, 1, 4, stages, target.amd_knobs(waves_per_eu=0))
        if m <= 64:
            tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
            return GemmConfig(64, 64, _split_for(target, tiles, k_steps, 1, 8), 4, 4, stages, knobs)
        if m <= 256:
            return GemmConfig(64, 128, 1, 8, 4, stages, knobs)
        return GemmConfig(128, 128, 1, 8, 8, stages, knobs)
    # Hopper (sm_90). Small M streams the weight: wide N tiles where N allows, K split until ~2 waves of
    # programs are in flight (none once the tiles alone make 1.5 waves), 3 stages. From
    # benchmarks/small_m_sweep.py on H200 (benchmarks/results/h200-issue16.md): every V3 shape's best
    # (tile, split, stages) at M = 1 and 16 is this rule's or within 5% of it; 4-5 stages were slower.
    if m <= 16:
        bn = 128 if n >= 4096 else 64 if n >= 1024 else 32
        tiles = triton.cdiv(n, bn)
        split = 1 if tiles >= 1.5 * target.num_sms else _split_for(target, tiles, k_steps, 2, 1)
        return GemmConfig(16, bn, split, 1, 4, 3)
    if m <= 64:
        tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
        return GemmConfig(64, 64, _split_for(target, tiles, k_steps, 1.5, 4), 4, 4, 4)
    if m <= 256:
        tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)
        return GemmConfig(64, 128, _split_for(target, tiles, k_steps, 1, 8), 8, 4, 4)
    # large M: split K only when the output tiles leave SMs idle (kv_a: N = 576 is 5 column tiles)
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    return GemmConfig(128, 128, _split_for(target, tiles, k_steps, 1, 8), 8, 8, 3)


# Weights up to this size are pulled into L2 whole by a PDL-launched GEMM before it waits for its input
# (H100 / H200 L2: 50 MB; the small V3 shapes q_a 11 MB, kv_a 4 MB, shared expert 15 MB fit with room
# for the running kernel's data); larger ones prefetch the pipeline's first num_stages K steps.
PREFETCH_WHOLE_BYTES = 16 << 20


def gemm_prefetch_steps(n: int, k: int, k_steps_per_split: int, cfg: GemmConfig) -> int:
    """K steps of its weight slice a PDL-launched GEMM program prefetches before waiting for its input."""
    return k_steps_per_split if n * k <= PREFETCH_WHOLE_BYTES else min(cfg.num_stages, k_steps_per_split)


# Activations up to this many rows are quantised inside the GEMM (one launch instead of two). Measured
# on H100 (benchmarks/results): at M=64 the in-kernel quantisation of 64x128 tiles, repeated by
# every column tile, made the GEMM 2-3x slower than act_quant + GEMM.
QUANT_IN_GEMM_MAX_M = 16


@dataclass(frozen=True)
class MoeConfig:
    block_m: int        # routed rows per program (one expert per block of rows)
    block_n_up: int     # gate+up output columns per program; 128 = one requantisation group
    block_n_down: int
    num_warps: int
    num_stages: int
    extra: dict = field(default_factory=dict)


def moe_config(target: Target, num_routed_rows: int, num_experts: int) -> MoeConfig:
    rows_per_expert = num_routed_rows / max(1, min(num_experts, num_routed_rows))
    if target.batch_invariant:
        rows_per_expert = 1
    bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 48 else 64 if rows_per_expert <= 160 else 128
    if target.is_amd:
        return MoeConfig(bm, 128, 64 if bm <= 32 else 128, 4 if bm <= 64 else 8, 2, target.amd_knobs())
    if num_routed_rows <= 16 and not target.batch_invariant:
        # one or two tokens (a row per expert): 256-column down tiles with 8 warps, from
        # benchmarks/decode_tuning_sweep.py on H200: 108 us at T = 1 against 121 with the tiles below
        # (floor 82); at T = 8 every candidate was within 1% of the rule below, which stays
        return MoeConfig(bm, 128, 256, 8, 4)
    return MoeConfig(bm, 128, 64 if bm <= 32 else 128, 4 if bm <= 64 else 8, 4 if bm <= 64 else 3)


@dataclass(frozen=True)
class AttnConfig:
    block_h: int        # query heads per program (decode) / query rows per program (prefill)
    block_n: int        # keys per step
    num_warps: int
    num_stages: int
    extra: dict = field(default_factory=dict)


def mla_decode_config(target: Target, num_heads: int, cache_dtype: torch.dtype = torch.bfloat16) -> AttnConfig:
    """num_stages is the software-pipelining depth of the kernel's key loop (tl.range)."""
    if target.is_amd:
        bh = max(16, min(triton.next_power_of_2(num_heads), 16))
        return AttnConfig(bh, 32, 4, 1, target.amd_knobs(waves_per_eu=1))
    # Hopper: 64 heads per program (V3's 128 in two programs), from benchmarks/mla_decode_sweep.py
    # on H100 at batch 64 x 4096: bf16 cache 462 us with 32-key steps (491 us with 64); an fp8 cache
    # wants 64-key steps (1022 us; 1484 us with 32), its widening to bf16 runs in registers.
    bh = max(16, min(triton.next_power_of_2(num_heads), 64))
    return AttnConfig(bh, 64 if cache_dtype.itemsize == 1 else 32, 8, 2)


def mla_decode_splits(target: Target, tokens: int, head_blocks: int, max_context: int, block_n: int) -> int:
    """KV splits per (token, head block). Few programs (batch <= 8): as many splits as fill one wave,
    down to one key step each (benchmarks/decode_tuning_sweep.py on H200, bf16 cache: batch 1 x 1024 14.4 us
    with 32 splits against 22.1 with 8; 1 x 4096 20.3 with 64 against 24.3 with 32; batch 8 x 4096 68 us
    with 8 against 79 with 16, where two waves lost; caches cold: inside the 61-layer model 1 x 1024 did not
    gain, its caches partly staying in L2). Otherwise enough for ~2 waves, >= 4 key steps each.
    Batch-invariant: a fixed count, so a token's split points depend on its own context alone."""
    if target.batch_invariant:
        return 16
    programs = tokens * head_blocks
    if not target.is_amd and 8 * programs <= target.num_sms:      # up to batch 8 at 2 head blocks: measured
        return max(1, min(target.num_sms // programs, triton.cdiv(max_context, block_n), 64))
    want = triton.cdiv(2 * target.num_sms, programs)
    return max(1, min(want, triton.cdiv(max_context, 4 * block_n), 64))


def mla_prefill_config(target: Target) -> AttnConfig:
    if target.is_amd:
        return AttnConfig(64, 64, 4, 1, target.amd_knobs(waves_per_eu=2))
    return AttnConfig(64, 64, 4, 2)
