"""NVIDIA backend plugin: backend `cuda` (alias `nvidia`). Triton FP8 kernels, imported only when chosen."""
import sys

from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec


def probe() -> str | None:
    import torch
    if torch.version.hip is not None:
        return "this torch is a ROCm build; use --backend rocm"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    return None


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="cuda", aliases=("nvidia",), device_type="cuda", probe=probe,
        default_profile="cuda-fp8", weight_formats=("dense", "fp8-block"),
        description="NVIDIA GPUs: Triton FP8 block-scaled kernels, cuBLAS where it is at the floor",
        cache_dtypes=("bfloat16", "float16", "float32", "float8_e4m3fn"))]


@hookimpl
def dsv3_backend_ops(backend):
    if backend != "cuda":
        return None
    from dsv3.backends.nvidia.ops import cuda_ops
    return cuda_ops()


@hookimpl
def dsv3_model_runner(backend, model, profile):
    """CUDA-graph replay of decode steps when the profile asks for it (cuda-fp8 does).

    An op table that would synchronise inside a decode step (ops marked host_syncing, see
    graphs.capture_blockers) runs eagerly, with one warning, instead of failing in capture."""
    if backend != "cuda" or not profile.cuda_graphs:
        return None
    from dsv3.backends.nvidia.graphs import CudaGraphRunner, capture_blockers
    if blockers := capture_blockers(model):
        print(f"dsv3: warning: CUDA graphs off, decode runs eagerly: {'; '.join(blockers)}", file=sys.stderr)
        return None
    max_context = min(model.cfg.max_position_embeddings, profile.kv_cache.max_tokens)
    return CudaGraphRunner(model, profile.kv_cache.block_size, max_context)


@hookimpl
def dsv3_distributed_backend(backend):
    return "nccl" if backend == "cuda" else None
