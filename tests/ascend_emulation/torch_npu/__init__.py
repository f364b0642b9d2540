"""EMULATED torch_npu for CPU test runs: `PYTHONPATH=tests/ascend_emulation DSV3_ASCEND_EMULATION=1`.

Re-exports dsv3.backends.ascend.emulation.kernels (plain-torch implementations of the documented
torch_npu kernels the ascend backend calls). Never put this directory on the path of a real NPU run.
"""
from dsv3.backends.ascend.emulation.kernels import *  # noqa: F401,F403
from dsv3.backends.ascend.emulation.kernels import CALL_LOG, EmulationError, __dsv3_emulation__  # noqa: F401
