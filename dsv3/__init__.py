"""dsv3: a DeepSeek-V3 inference runtime whose hardware backends are plugins.

`from dsv3 import LLM` is the Python API. Importing dsv3 imports neither triton nor torch_npu.
"""
__version__ = "0.1.0"

__all__ = ["LLM", "__version__"]


def __getattr__(name):
    if name == "LLM":
        from dsv3.llm import LLM
        return LLM
    raise AttributeError(name)
