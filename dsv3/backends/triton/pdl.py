"""Programmatic dependent launch (PDL, sm_90 and later): a kernel starts while the one before it drains.

A batch-1 decode step at DeepSeek-V3's depth is ~1,500 short kernels, and each pays a ramp (launch, the
first loads in flight) and a tail (the last wave, split-K reductions) during which the memory system is
mostly idle: at M = 1 the FP8 GEMMs ran at 2-7x their weight-read floor with a fixed ~6 us per call. With
PDL the next kernel's programs become resident as soon as every program of the running one has called
`gdc_launch_dependents`; they do what does not depend on that kernel's results (the GEMMs pull their
weight tiles into L2) and then block in `gdc_wait` until it has completed and its writes are visible.

Every kernel launched with `launch_pdl=True` (`launch_options(True)`) keeps two rules:
  - before `gdc_wait` it reads no memory an earlier kernel writes, and writes no memory at all;
  - it calls `gdc_wait` in every program (`start(PDL)`), so ordering stays transitive down the chain:
    the kernel after it cannot pass its own wait before this one has completed.
Kernels launched without the attribute (cuBLAS, torch's own) wait for full completion as usual, and a
PDL kernel after one of them starts when it completes. CUDA graph capture keeps the programmatic edges.

Opt-in (DSV3_PDL=1), because on one H200 it did not pay (benchmarks/results/h200-session5.md, `bench
--depth 61`, context 1024, same session): batch 1 18.26 ms with it against 18.14 without, batch 8 50.53
against 47.91, batch 64 154.9 against 150.6. ncu on the one-row GEMMs shows why there was little to win:
they are latency chains inside each program (~2 resident programs per SM, an instruction issued every
~3 cycles, DRAM 11% busy), which starting earlier does not shorten. Never on for AMD (no grid dependency
control), in the interpreter, or below sm_90. `dsv3-run bench` says in its header which way it ran.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

PDL_ENV = "DSV3_PDL"


def available() -> bool:
    """PDL asked for (DSV3_PDL=1) and possible: sm_90+, compiled (not interpreted), a Triton with grid dependency control."""
    import torch
    if os.environ.get(PDL_ENV, "0") != "1" or os.environ.get("TRITON_INTERPRET", "") == "1":
        return False
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    if torch.cuda.get_device_capability()[0] < 9:
        return False
    return hasattr(tl.extra.cuda, "gdc_wait")


def launch_options(pdl: bool) -> dict:
    """Launch keywords for a kernel taking the PDL constexpr: the flag itself and, when on, the launch attribute."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def start(PDL: tl.constexpr):
    """Wait for the previous kernel's results, then let the next kernel launch (a no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (any shape; one request per element), kept with evict_last
    priority; nothing is returned or waited for. For data no earlier kernel writes (weights)."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
