"""Checkpoint loading: the official HF layout, safetensors only, memory-mapped, never unpickled.

A model directory holds config.json and either one `model.safetensors` or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time from the memory-mapped shard,
converted to the model's weight format and copied to the parameter's device, so host memory stays
near one tensor. FP8 weights come with a float32 `weight_scale_inv`; the routed experts, stored per
expert in the checkpoint, are stacked into the model's [E, ...] parameters (the one rename).
"""
from __future__ import annotations

import json
import re
import struct
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from dsv3.core.errors import CheckpointError
from dsv3.core.model import DeepseekV3, Linear
from dsv3.core.quant import fp8_fn_to_fnuz, quantize_fp8_block, quantize_int8_channel
from dsv3.core.weights import QuantWeight, dequantize, scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                       "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "F8_E8M0", "F4"}


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; pass --model DIR with a DeepSeek-V3 HF checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; --model takes the checkpoint directory, not a file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a model directory needs the HF config.json "
                              f"next to its safetensors files")
    return path


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without trusting it: sizes, offsets, overlaps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: not a safetensors file, or truncated: the header claims {n} "
                                      f"bytes but the file has {size - 8} after the length field")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt "
                              f"or not safetensors") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from e
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {[begin, end]}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} but the file holds only "
                                  f"{data_size} data bytes: the file is truncated; download it again")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file; it is corrupt")
    return header


class Checkpoint:
    """Which file holds each tensor, and reading them (memory-mapped, via safetensors)."""

    def __init__(self, path: str | Path):
        self.path = check_model_dir(path)
        self.file_of: dict[str, Path] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
            for name, fname in weight_map.items():
                f = self.path / fname
                if f.resolve().parent != self.path.resolve():
                    raise CheckpointError(f"{index}: tensor {name!r} points outside the model directory ({fname})")
                self.file_of[name] = f
            for f in sorted(set(self.file_of.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing from {self.path}; "
                                          f"the download is incomplete")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                hint = (f" It has {', '.join(pickles[:3])}: pickle files, which dsv3 never loads because "
                        f"unpickling can run code; use a safetensors checkpoint." if pickles else "")
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}.{hint}")
            for f in files:
                for name in read_safetensors_header(f):
                    if name != "__metadata__":
                        self.file_of[name] = f
        self.headers = {f: read_safetensors_header(f) for f in sorted(set(self.file_of.values()))}
        for name, f in self.file_of.items():
            if name not in self.headers[f]:
                raise CheckpointError(f"{f}: the index says it holds {name!r}, but the file has no such tensor")
        self._stack = ExitStack()
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> list[int]:
        return self.headers[self.file_of[name]][name]["shape"]

    def get(self, name: str) -> torch.Tensor:
        f = self.file_of[name]
        if f not in self._handles:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from e
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from e

    def close(self):
        self._stack.close()
        self._handles.clear()


def checkpoint_format(ckpt: Checkpoint) -> str:
    """The weight format of the big projections: fp8-block if any weight_scale_inv is present."""
    return "fp8-block" if any(n.endswith(".weight_scale_inv") for n in ckpt.file_of) else "dense"


def has_mtp(ckpt: Checkpoint, num_layers: int) -> bool:
    return f"model.layers.{num_layers}.eh_proj.weight" in ckpt


def convert_weight(src: QuantWeight, fmt: str, dtype: torch.dtype, ue8m0: bool = False) -> QuantWeight:
    """Change a weight's format (dense dtype `dtype`); same format passes through untouched."""
    if src.format == fmt:
        return src if fmt != "dense" else QuantWeight(src.data.to(dtype), None, fmt)
    if fmt == "dense":
        return QuantWeight(dequantize(src, dtype), None, "dense")
    if fmt == "fp8-fnuz" and src.format == "fp8-block":
        return fp8_fn_to_fnuz(src)
    real = dequantize(src, torch.float32)
    if fmt == "fp8-block":
        return quantize_fp8_block(real, ue8m0=ue8m0)
    if fmt == "fp8-fnuz":
        return quantize_fp8_block(real, ue8m0=ue8m0, dtype=torch.float8_e4m3fnuz)
    if fmt == "int8-w8a8":
        return quantize_int8_channel(real)
    raise CheckpointError(f"cannot convert weights from {src.format} to {fmt}")


def _read_weight(ckpt: Checkpoint, prefix: str, out_f: int, in_f: int) -> QuantWeight:
    """Read `prefix.weight` (+ its scale) in whatever format the checkpoint stores it."""
    name = f"{prefix}.weight"
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing; the checkpoint does not match config.json")
    data = ckpt.get(name)
    if list(data.shape) != [out_f, in_f]:
        raise CheckpointError(f"{ckpt.file_of[name]}: tensor {name!r} has shape {list(data.shape)}, "
                              f"config.json implies {[out_f, in_f]}")
    if data.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        fmt = "fp8-block" if data.dtype == torch.float8_e4m3fn else "fp8-fnuz"
        scale_name = f"{prefix}.weight_scale_inv"
    elif data.dtype == torch.int8:
        fmt, scale_name = "int8-w8a8", f"{prefix}.weight_scale"
    else:
        return QuantWeight(data, None, "dense")
    if scale_name not in ckpt:
        raise CheckpointError(f"{ckpt.path}: {data.dtype} tensor {name!r} has no {scale_name!r}")
    scale = ckpt.get(scale_name).float()
    want = list(scale_shape(fmt, out_f, in_f))
    if fmt == "int8-w8a8" and scale.dim() == 2:   # ModelSlim stores [out, 1]
        scale = scale.flatten()
    if list(scale.shape) != want:
        raise CheckpointError(f"{ckpt.file_of[scale_name]}: tensor {scale_name!r} has shape {list(scale.shape)}, "
                              f"expected {want} for a [{out_f}, {in_f}] {fmt} weight")
    return QuantWeight(data, scale, fmt)


def _assign(linear: Linear, w: QuantWeight, index: int | None = None) -> None:
    dst_w = linear.weight if index is None else linear.weight[index]
    dst_w.copy_(w.data)
    if w.scale is not None:
        dst_s = getattr(linear, linear.scale_name)
        (dst_s if index is None else dst_s[index]).copy_(w.scale)


def expected_tensors(model: DeepseekV3) -> dict[str, tuple[list[int], torch.dtype]]:
    """Checkpoint name -> (shape, dtype) this model reads: the official layout, experts unstacked."""
    out = {}
    for name, p in model.state_dict(keep_vars=True).items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(.+)$", name)
        if m:
            first = model.get_submodule(m.group(1)).first_expert
            for e in range(p.shape[0]):
                out[f"{m.group(1)}.{first + e}.{m.group(2)}.{m.group(3)}"] = (list(p.shape[1:]), p.dtype)
        else:
            out[name] = (list(p.shape), p.dtype)
    return out


def load_weights(model: DeepseekV3, ckpt: Checkpoint, progress: bool | None = None, ue8m0: bool = False) -> None:
    """Fill every parameter of `model` from `ckpt`, converting formats as needed.

    Missing tensors, wrong shapes and tensors the model does not know are errors that name them.
    """
    cfg, dtype = model.cfg, model.dtype
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    done: set[str] = set()
    total = len(linears) + sum(1 for _ in model.named_parameters())
    shown = _Progress(total, enabled=progress)
    with torch.no_grad():
        for prefix, lin in linears.items():
            shape_o, shape_i = lin.weight.shape[-2:]
            if lin.weight.dim() == 3:  # stacked experts: checkpoint has experts.{e}.<proj>
                experts = model.get_submodule(prefix.rsplit(".", 1)[0])
                base, proj = prefix.rsplit(".", 1)
                for e in range(lin.weight.shape[0]):
                    src = f"{base}.{experts.first_expert + e}.{proj}"
                    _assign(lin, convert_weight(_read_weight(ckpt, src, shape_o, shape_i), lin.format, dtype, ue8m0), e)
                    done.update({f"{src}.weight", f"{src}.weight_scale_inv", f"{src}.weight_scale"})
            else:
                _assign(lin, convert_weight(_read_weight(ckpt, prefix, shape_o, shape_i), lin.format, dtype, ue8m0))
                done.update({f"{prefix}.weight", f"{prefix}.weight_scale_inv", f"{prefix}.weight_scale"})
            shown.step()
        for name, p in model.named_parameters():
            if name in done or any(name.startswith(f"{pre}.") for pre in linears):
                continue
            if name not in ckpt:
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing; the checkpoint does not match "
                                      f"config.json")
            t = ckpt.get(name)
            if list(t.shape) != list(p.shape):
                raise CheckpointError(f"{ckpt.file_of[name]}: tensor {name!r} has shape {list(t.shape)}, "
                                      f"config.json implies {list(p.shape)}")
            p.copy_(t.to(p.dtype))
            done.add(name)
            shown.step()
    shown.close()
    unused = [n for n in ckpt.names() if n not in done and not _skippable(n, cfg.num_hidden_layers, model.has_mtp)]
    if unused:
        raise CheckpointError(f"{ckpt.path}: {len(unused)} tensor(s) the model does not use, e.g. {unused[0]!r}; "
                              f"config.json and the checkpoint disagree")


def _skippable(name: str, num_layers: int, with_mtp: bool) -> bool:
    """Tensors we may leave unread: the MTP layer when not running it, rotary caches some exporters save."""
    return name.endswith("rotary_emb.inv_freq") or (not with_mtp and name.startswith(f"model.layers.{num_layers}."))


class _Progress:
    """Loading progress on a terminal (tensor count); silent when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.n = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self):
        self.n += 1
        if self.enabled and (self.n % 16 == 0 or self.n == self.total):
            print(f"\rloading weights {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr)
