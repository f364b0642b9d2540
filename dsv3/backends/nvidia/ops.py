"""The `cuda` op table. Kernels live in dsv3.backends.triton (shared with AMD)."""


def cuda_ops() -> dict:
    return {}
