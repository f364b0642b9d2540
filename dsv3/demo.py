"""The embedded default model, used when no --model is given.

`dsv3/demo_model/` is a small DeepSeek-V3 (MLA, DeepSeekMoE with 16 routed experts, one MTP layer)
trained on the Python standard library's sources by `tools/train_demo.py`, shipped in the official
HF FP8 layout with its byte-level BPE tokenizer (~21 MB). It completes Python code; its held-out
split (`heldout.jsonl`) is what `dsv3-run eval` scores by default.
"""
from __future__ import annotations

from pathlib import Path

from dsv3.core.errors import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


def demo_model_path() -> Path:
    if not (DEMO_DIR / "model.safetensors").is_file():
        raise CheckpointError(f"{DEMO_DIR}: the embedded demo model is missing from this installation; "
                              f"reinstall dsv3, or give a model path (--model DIR, or LLM(model_path))")
    return DEMO_DIR
