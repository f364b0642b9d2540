"""AMD backend plugin: backend `rocm` (alias `amd`). Same Triton kernels as NVIDIA, AMD tuning and FP8 dtype."""
from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec


def probe() -> str | None:
    import torch
    if torch.version.hip is None:
        return ("this torch is not a ROCm build (torch.version.hip is None); on an AMD Instinct machine install "
                "torch for ROCm, then --backend rocm (or amd) selects this backend")
    if not torch.cuda.is_available():
        return "ROCm torch sees no AMD GPU (torch.cuda.is_available() is False)"
    return None


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="rocm", aliases=("amd",), device_type="cuda", probe=probe,
        default_profile="rocm-fp8", weight_formats=("dense", "fp8-block", "fp8-fnuz"),
        description="AMD Instinct GPUs (MI300: fp8 e4m3fnuz, MI350: e4m3fn) via ROCm Triton",
        cache_dtypes=("bfloat16", "float16", "float32"))]


@hookimpl
def dsv3_backend_ops(backend):
    if backend != "rocm":
        return None
    from dsv3.backends.amd.ops import rocm_ops
    return rocm_ops()


@hookimpl
def dsv3_prepare_weights(backend, model, profile):
    """MI300 (gfx942) multiplies e4m3fnuz: convert e4m3fn checkpoints once, exactly, at load."""
    if backend != "rocm":
        return
    from dsv3.backends.amd.ops import FP8_BY_ARCH, convert_weights_to_fnuz, device_arch
    import torch
    if FP8_BY_ARCH.get(device_arch()) == torch.float8_e4m3fnuz:
        convert_weights_to_fnuz(model)


@hookimpl
def dsv3_distributed_backend(backend):
    return "nccl" if backend == "rocm" else None  # RCCL answers to "nccl" under ROCm
