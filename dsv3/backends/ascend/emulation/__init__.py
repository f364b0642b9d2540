"""A CPU emulation of the torch_npu kernels the ascend backend calls. EMULATED: nothing here is NPU code.

Each function has the parameter list of torch_npu 2.13.0's schema (torch_npu/csrc/aten/
npu_native_functions_by_codegen.yaml in the wheel; checked by tests/test_ascend_signatures.py) and
implements the documented math in plain torch: shapes, output dtypes, int8 rounding (half to even,
as torch.round and the CANN goldens' numpy.round), int32 accumulation, the routing rules. Where a
document states a constraint the emulation raises `EmulationError` instead of computing, so a
call the hardware would reject fails here too. Features we do not call raise NotImplementedError.
Outputs the documents call undefined (rows past the valid count, normOut without out_flag) are
filled with NaN where the dtype allows, so code that reads them fails loudly.

Use it as `torch_npu` in one of two ways (both are for tests and demos, never for production):
  - in-process: `install(monkeypatch)` in pytest, or `sys.modules["torch_npu"] = kernels`;
  - a fresh process: `PYTHONPATH=tests/ascend_emulation DSV3_ASCEND_EMULATION=1 dsv3-run ...`
    (tests/ascend_emulation/torch_npu re-exports this package).
Either way set DSV3_ASCEND_EMULATION=1 and the profile override `device: cpu`; the ascend plugin
refuses the emulation without that flag, so an emulated result is never mistaken for an NPU one.
"""
from dsv3.backends.ascend.emulation import kernels
from dsv3.backends.ascend import EMULATION_ENV


def install(monkeypatch) -> None:
    """Make `import torch_npu` return the emulation for one pytest test (undone after it)."""
    import sys
    monkeypatch.setitem(sys.modules, "torch_npu", kernels)
    monkeypatch.setenv(EMULATION_ENV, "1")
