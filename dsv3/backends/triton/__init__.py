"""Triton kernels shared by the NVIDIA (`cuda`) and AMD (`rocm`) backends.

One source per kernel. What differs between vendors is only data: the FP8 dtype (e4m3fn on Hopper
and MI350, e4m3fnuz on MI300) and the tuning tables in `tuning.py` (block shapes, warps, stages,
and on AMD `waves_per_eu`, `matrix_instr_nonkdim`, `kpack`). `ops.make_ops(target)` builds the
op table for a target; the backends' plugins call it only when chosen, so `import dsv3` never
imports triton.

Modules: quant (1x128 activation quantisation), gemm (FP8 block-scaled GEMM, split-K for small M),
moe (routing alignment + grouped FP8 GEMMs with SiLU*up and requantisation fused), mla (decode over
the paged latent cache with split-KV; varlen causal prefill), norm (RMSNorm, fused residual add),
elementwise (RoPE, SiLU*up, latent-cache write), gate (noaux_tc routing, one launch), counters (the
self-resetting arrival counters of the one-launch split-K GEMM and router), tuning, ops, targets
(compile-only checks for sm_90 / gfx942 / gfx950).
"""
