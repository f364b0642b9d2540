"""The reference backend as a plugin: backend `cpu` (alias `reference`), pure PyTorch."""
from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="cpu", aliases=("reference",), device_type="cpu", probe=lambda: None,
        default_profile="cpu", weight_formats=("dense", "fp8-block", "fp8-fnuz", "int8-w8a8"),
        description="pure-PyTorch reference ops; runs anywhere, the oracle for every other backend")]


@hookimpl
def dsv3_backend_ops(backend):
    if backend == "cpu":
        from dsv3.backends.reference.ops import OPS, SPARSE_OPS
        return {**OPS, **SPARSE_OPS}
    return None


@hookimpl
def dsv3_distributed_backend(backend):
    return "gloo" if backend == "cpu" else None
