"""Huawei Ascend backend plugin: backend `ascend` (alias `npu`), torch_npu W8A8 INT8 and BF16."""
import importlib.util
import os

from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec


def probe() -> str | None:
    # Never import torch_npu here: without CANN it fails, and it can break `import torch`.
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install torch-npu, with Huawei's CANN toolkit)"
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")):
        return "torch_npu is installed but CANN is not set up (source set_env.sh from the CANN toolkit)"
    return None


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="ascend", aliases=("npu",), device_type="npu", probe=probe,
        default_profile="ascend-w8a8", weight_formats=("dense", "int8-w8a8"),
        description="Huawei Ascend NPUs (Atlas 800I A2 / 910B) via torch_npu: W8A8 INT8 and BF16",
        cache_dtypes=("bfloat16", "float16"))]


@hookimpl
def dsv3_distributed_backend(backend):
    return "hccl" if backend == "ascend" else None
