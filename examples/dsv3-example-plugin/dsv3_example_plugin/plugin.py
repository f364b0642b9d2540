"""The plugin module the `dsv3` entry point names. Cheap to import: ops are imported when asked for."""
from pathlib import Path

from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec


def probe() -> str | None:
    return None  # runs on any CPU; a real backend checks for its device and driver here, without importing its SDK


@hookimpl
def dsv3_register_backends():
    return [BackendSpec(
        name="example", aliases=("example-int8",), device_type="cpu", probe=probe,
        default_profile=str(Path(__file__).with_name("example.yaml")),
        weight_formats=("dense", "int8-w8a8"), cache_dtypes=("float32", "bfloat16"),
        description="example plugin: W8A8 int8 linear layers on the CPU, as an int8 accelerator would run them")]


@hookimpl
def dsv3_backend_ops(backend):
    from dsv3_example_plugin import ops
    if backend == "example":        # our own backend: the ops we implement; the rest fall back to the reference
        return {"rms_norm": ops.rms_norm, "add_rms_norm": ops.add_rms_norm, "silu_mul": ops.silu_mul,
                "linear": ops.linear}
    if backend == "cpu":            # someone else's backend: replace exactly one op
        return {"rms_norm": ops.rms_norm}
    return None


@hookimpl
def dsv3_distributed_backend(backend):
    return "gloo" if backend == "example" else None
