"""The embedded default model, used when no --model is given.

Until a trained demo model ships with the package, this is a tiny random DeepSeek-V3 in the official
FP8 layout, generated deterministically (fixed seed, fixed corpus for its tokenizer) into the user's
cache directory on first use. Its completions are random text: it exercises every code path, it is
not a language model.
"""
from __future__ import annotations

import os
from pathlib import Path

NAME = "tiny-random-fp8-v1"


def _corpus() -> list[str]:
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this  # stable across CPython versions
    zen = codecs.decode(this.s, "rot13")
    return [zen] * 4 + [line for line in zen.splitlines() if line]


def demo_model_path() -> Path:
    root = Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache" / "dsv3"))
    path = root / NAME
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    from dsv3.core.config import ModelConfig
    from dsv3.core.synthetic import TINY_CONFIG, random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer
    tmp = root / f".{NAME}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tmp, TINY_CONFIG["vocab_size"], _corpus())
    tensors = to_checkpoint_format(random_weights(ModelConfig.from_hf(TINY_CONFIG), seed=1234), "fp8-block")
    write_checkpoint(tmp, TINY_CONFIG, tensors, fmt="fp8-block")
    if not path.exists():
        os.replace(tmp, path)  # atomic: a half-written model is never found under the real name
    return path
