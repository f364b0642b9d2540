"""The Ascend backend: torch_npu ops (ops.py), imported only once the backend is chosen (plugin.py)."""

EMULATION_ENV = "DSV3_ASCEND_EMULATION"      # "1": the importable torch_npu is dsv3's CPU emulation
