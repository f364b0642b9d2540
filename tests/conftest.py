"""Which way Triton kernels run in this pytest process, chosen once before any test imports triton.

`import triton` decides whether triton's own library functions (tl.sum, tl.max, tl.sigmoid, ...) are
compiled or interpreted, and @triton.jit decides the same for our kernels when they are decorated, so
one process cannot hold both kinds: kernels interpreted after another test module imported triton for
the GPU fail with "Cannot call @triton.jit'd outside of the scope of a kernel". Hence:
- no CUDA GPU (CI): TRITON_INTERPRET=1 for the whole run, so the interpreter tests
  (test_triton_kernels.py, the rocm op table in test_rocm_backend.py) work in any order; the
  compile-only checks (test_triton_compile.py) compile in subprocesses without it;
- a CUDA GPU: compiled kernels, so test_cuda_backend.py runs; the interpreter tests skip themselves
  unless the run was started with TRITON_INTERPRET=1 (which in turn skips the GPU tests).
"""
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py chose the interpreter"
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402 - after the TRITON_INTERPRET choice above, which must come first


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module: the tiny model's ops gain nothing from threads, and on
    a busy 2-core runner OpenMP's spinning workers (fighting an engine thread and an event loop) slow
    them down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
