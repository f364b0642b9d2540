"""The `rocm` op table and weight preparation: the shared Triton kernels with AMD dtype and tuning.

FP8 by arch: gfx942 (MI300X/MI325X) multiplies float8_e4m3fnuz natively, so e4m3fn checkpoints
are converted once at load (same bits, scale doubled, -0 -> 0: dsv3.core.quant.fp8_fn_to_fnuz) and
activations are quantised with fnuz's max (240), which the kernels take from the weight's dtype;
gfx950 (MI350X/MI355X) runs e4m3fn as stored. Tuning: dsv3.backends.triton.tuning, AMD rows.
"""
from __future__ import annotations

import os

import torch

from dsv3.core.quant import fp8_fn_to_fnuz

FP8_BY_ARCH = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}
COMPUTE_UNITS = {"gfx942": 304, "gfx950": 256}   # MI300X, MI355X; read from the device when there is one


ARCH_ENV = "DSV3_ROCM_ARCH"   # names the arch where there is no AMD GPU (interpreter / CI: gfx942 or gfx950)


def device_arch() -> str:
    """gfx name of GPU 0 under ROCm torch ('gfx942:sramecc+:xnack-' -> 'gfx942'), or $DSV3_ROCM_ARCH."""
    if os.environ.get(ARCH_ENV):
        return os.environ[ARCH_ENV]
    if torch.version.hip is None or not torch.cuda.is_available():
        raise RuntimeError(f"no AMD GPU here to read the arch from; set {ARCH_ENV}=gfx942 or gfx950 to build the "
                           f"rocm op table for a named arch (e.g. TRITON_INTERPRET=1 on the CPU)")
    return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]


def rocm_target(arch: str | None = None):
    from dsv3.backends.triton.tuning import Target, batch_invariant_requested
    arch = arch or device_arch()
    if arch not in FP8_BY_ARCH:
        raise ValueError(f"AMD GPU arch {arch!r} has no tuning table; supported: {', '.join(FP8_BY_ARCH)} "
                         f"(MI300X/MI325X, MI350X/MI355X)")
    units = COMPUTE_UNITS[arch]
    if torch.cuda.is_available() and torch.version.hip is not None:
        units = torch.cuda.get_device_properties(0).multi_processor_count
    return Target(arch, FP8_BY_ARCH[arch], num_sms=units, batch_invariant=batch_invariant_requested())


def rocm_ops(arch: str | None = None) -> dict:
    from dsv3.backends.triton.ops import make_ops
    return make_ops(rocm_target(arch))


def convert_weights_to_fnuz(model) -> int:
    """In place: every e4m3fn block-scaled Linear of `model` -> e4m3fnuz (exact). Returns how many."""
    from dsv3.core.model import Linear
    done = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.format == "fp8-block":
            q = fp8_fn_to_fnuz(m.qweight)
            m.weight.data = q.data
            getattr(m, m.scale_name).data = q.scale
            m.format = q.format
            done += 1
    return done
