"""Huawei Ascend backend plugin: backend `ascend` (alias `npu`), torch_npu W8A8 INT8 and BF16.

Cheap to import: torch_npu is imported only by `dsv3_backend_ops` (via dsv3.backends.ascend.ops),
never by the probe; without CANN `import torch_npu` fails, and an installed torch-npu can break
`import torch` unless TORCH_DEVICE_BACKEND_AUTOLOAD=0. See README.md for what has run where.
"""
from __future__ import annotations

import importlib.util
import os

from dsv3.backends.ascend import EMULATION_ENV
from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec

VISIBLE_ENV = "ASCEND_RT_VISIBLE_DEVICES"     # CANN's device mask, like CUDA_VISIBLE_DEVICES


def emulated() -> bool:
    return os.environ.get(EMULATION_ENV) == "1"


def visible_devices() -> list[int] | None:
    """Physical NPU ids this process may use, from ASCEND_RT_VISIBLE_DEVICES; None when unset (all).

    CANN renumbers them from 0, so the process sees them as npu:0 .. npu:len-1."""
    raw = os.environ.get(VISIBLE_ENV)
    if raw is None:
        return None
    return [int(d) for d in raw.replace(" ", "").split(",") if d]


def device_for_rank(local_rank: int) -> str:
    """The torch device of one rank on a host: npu:<local_rank> among the visible devices."""
    visible = visible_devices()
    if visible is not None and local_rank >= len(visible):
        raise ValueError(f"local rank {local_rank} has no NPU: {VISIBLE_ENV}={os.environ[VISIBLE_ENV]!r} makes "
                         f"{len(visible)} visible; launch at most {len(visible)} ranks on this host or widen it")
    return f"npu:{local_rank}"


def probe() -> str | None:
    # Never import torch_npu here: without CANN it fails, and it can break `import torch`.
    if emulated():
        if importlib.util.find_spec("torch_npu") is None:
            return (f"{EMULATION_ENV}=1 but no torch_npu emulation is importable; put tests/ascend_emulation "
                    f"on PYTHONPATH")
        return None
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install torch-npu, with Huawei's CANN toolkit)"
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")):
        return "torch_npu is installed but CANN is not set up (source set_env.sh from the CANN toolkit)"
    if visible_devices() == []:
        return f"{VISIBLE_ENV} is set but empty: no NPU is visible to this process"
    return None


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="ascend", aliases=("npu",), device_type="npu", probe=probe,
        default_profile="ascend-w8a8", weight_formats=("dense", "int8-w8a8"),
        description="Huawei Ascend NPUs (Atlas 800I A2 / 910B) via torch_npu: W8A8 INT8 and BF16",
        cache_dtypes=("bfloat16", "float16"),
        extra={"emulated": emulated()})]   # listings say "emulated", never that an NPU is here


@hookimpl
def dsv3_backend_ops(backend):
    if backend != "ascend":
        return None
    from dsv3.backends.ascend.ops import ascend_ops
    return ascend_ops()


@hookimpl
def dsv3_validate_profile(profile):
    if profile.backend not in ("ascend", "npu"):
        return None
    device = profile.device or "npu"
    problems = []
    if emulated() and device != "cpu":
        problems.append(f"{EMULATION_ENV}=1 runs the torch_npu emulation on CPU tensors; set `device: cpu` "
                        f"(got {device!r})")
    if not emulated() and device.split(":")[0] != "npu":
        problems.append(f"backend 'ascend' runs on device 'npu', not {device!r} (CPU runs need the emulation: "
                        f"{EMULATION_ENV}=1 with tests/ascend_emulation on PYTHONPATH)")
    visible = visible_devices()
    if device.startswith("npu:") and visible is not None and int(device.split(":")[1]) >= len(visible):
        problems.append(f"device {device!r} is not visible: {VISIBLE_ENV}={os.environ[VISIBLE_ENV]!r} exposes "
                        f"npu:0..npu:{len(visible) - 1}")
    return problems


@hookimpl
def dsv3_distributed_backend(backend):
    return "hccl" if backend == "ascend" else None
