"""Checkpoint loading: the official HF layout, safetensors only, memory-mapped, never unpickled.

A model directory holds config.json and either one `model.safetensors` or shards listed by
`model.safetensors.index.json`. Every header is validated before any data is read (sizes, offsets,
overlaps, dtypes and shapes against the model config.json describes), so a bad file fails before a
single parameter changes.

Loading streams: shards are visited in order, one at a time; each tensor goes from the memory-mapped
shard to the parameter's device and is converted there, in row chunks, straight into the parameter.
Host memory beyond the model stays near one shard's mapped pages plus one chunk of conversion
scratch, whatever the checkpoint size; a shard is unmapped before the next is opened.

Formats read (`weight` + its companions): dense (bf16/fp16/fp32); FP8 e4m3fn or e4m3fnuz with a
float32 `weight_scale_inv` per 128x128 block; INT8 in the ModelSlim W8A8 layout Ascend peers use
(`weight` int8, `weight_scale` [out] or [out, 1], optional `weight_offset` of the same shape, with
`quant_model_description.json` naming each tensor's quant type). The routed experts, stored per
expert in the checkpoint, are stacked into the model's [E, ...] parameters (the one rename).

Official checkpoints store the MTP layer's embedding and output head as copies of the main model's
(`mtp_copies`); after loading, copies equal bit for bit share the main model's storage.

Tensor / expert parallelism: a model built for one rank holds a slice of some parameters and a
contiguous range of routed experts (`Experts.first_expert`, local count = its weight's first dim).
`load_weights(..., slicer=...)` takes a `Slicer`: for each checkpoint tensor the rank reads it
returns the part the rank keeps, and only those bytes are read (safetensors `get_slice`).
"""
from __future__ import annotations

import json
import math
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from dsv3.core.errors import CheckpointError, brief
from dsv3.core.model import DeepseekV3, Experts, Linear
from dsv3.core.quant import fp8_fn_to_fnuz, quantize_fp8_block, quantize_int8_channel
from dsv3.core.weights import BLOCK, QuantWeight, dequantize, scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODELSLIM_DESCRIPTION = "quant_model_description.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The checkpoint stores routed experts one by one, `<layer>.mlp.experts.<e>.<proj>.<tensor>`; the model
# stacks them, `<layer>.mlp.experts.<proj>.<tensor>` with the expert as the leading dim. This is the one
# place that naming rule lives (the loader, the parallel slicer and the converter's report use it).
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(.+)$")


def expert_prefix(experts: str, expert: int, proj: str) -> str:
    """The checkpoint prefix of one expert's projection: experts `model.layers.3.mlp.experts`, expert
    17, proj `up_proj` -> `model.layers.3.mlp.experts.17.up_proj` (+ `.weight`, `.weight_scale_inv`)."""
    return f"{experts}.{expert}.{proj}"


def expert_tensor_name(experts: str, expert: int, proj: str, tensor: str = "weight") -> str:
    return f"{expert_prefix(experts, expert, proj)}.{tensor}"


def parse_expert_tensor_name(name: str) -> tuple[str, int, str, str] | None:
    """`...mlp.experts.17.up_proj.weight` -> ("...mlp.experts", 17, "up_proj", "weight"); None if not a
    routed expert's tensor."""
    m = _EXPERT.match(name)
    return (m.group(1), int(m.group(2)), m.group(3), m.group(4)) if m else None


def parse_stacked_expert_name(name: str) -> tuple[str, str, str] | None:
    """The model's stacked name `...mlp.experts.up_proj.weight` -> ("...mlp.experts", "up_proj", "weight")."""
    m = _STACKED_EXPERTS.match(name)
    return (m.group(1), m.group(2), m.group(3)) if m else None
# bits per element of each safetensors dtype (F4 packs two per byte)
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "U16": 16, "U32": 32, "U64": 64}
_SAFETENSORS_DTYPES = set(_DTYPE_BITS)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# quant types in quant_model_description.json that mean "int8 weight, per-channel scale (+ offset)"
MODELSLIM_W8A8 = ("W8A8_DYNAMIC", "W8A8")
_MAGIC = ((b"\x80", "a Python pickle (torch.save)"), (b"PK\x03\x04", "a zip archive (torch.save's format)"))

# A Slicer maps (checkpoint tensor name, its full shape) to the part this rank keeps: one slice per
# dimension (step 1), or None for the whole tensor. See `load_weights`.
Slicer = Callable[[str, tuple[int, ...]], "tuple[slice, ...] | None"]


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; the model path (--model DIR, or LLM's model_path) is a DeepSeek-V3 HF checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; the model path (--model DIR, or LLM's model_path) is the checkpoint directory, not a file")
    config = path / "config.json"
    if not (config.exists() or config.is_symlink()):
        raise CheckpointError(f"{path}: no config.json; a model directory needs the HF config.json "
                              f"next to its safetensors files")
    check_regular_file(config, path)
    return path


def _inside(f: Path, model_dir: Path) -> bool:
    """Is `f` (symlinks followed) directly in the model directory? huggingface_hub's cache counts as
    inside: snapshots/REV/NAME links to ../../blobs/HASH."""
    parent, home = f.resolve().parent, model_dir.resolve()
    return parent == home or (home.parent.name == "snapshots" and parent == home.parent.parent / "blobs")


def check_regular_file(f: Path, model_dir: Path) -> None:
    """Refuse a file of the model directory that links outside it (it would read whatever it points to)
    or is not a regular file (reading a FIFO blocks forever; a device never ends)."""
    if not _inside(f, model_dir):
        raise CheckpointError(f"{f}: links to {f.resolve()}, outside the model directory; dsv3 reads only files "
                              f"inside it (copy the file into {model_dir})")
    if not f.is_file():
        raise CheckpointError(f"{f}: not a regular file (a FIFO, device or directory); a checkpoint's files are "
                              f"regular files" if f.exists() else f"{f}: a broken symlink; the download is incomplete")


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without trusting it: sizes, offsets, overlaps.

    Nothing after the header is read, and nothing is ever unpickled: a pickle or zip file (what
    torch.save writes) is recognised by its first bytes and refused.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= min(size - 8, 100 * 2**20) else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    if not raw.startswith(b"{"):   # a safetensors header is a JSON object
        for magic, what in _MAGIC:
            if head.startswith(magic):
                raise CheckpointError(f"{path}: this is {what}, not safetensors; dsv3 never loads pickles "
                                      f"because unpickling can run code. Use the safetensors release of "
                                      f"the checkpoint")
        if n is None:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated: the header claims {n} "
                                  f"bytes but the file has {size - 8} after the length field")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({brief(str(e), 200)}); the file is "
                              f"corrupt, not safetensors, or its header length field is wrong") from e
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
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {[begin, end]}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} but the file holds only "
                                  f"{data_size} data bytes: the file is truncated; download it again")
        want = math.ceil(math.prod(shape) * _DTYPE_BITS[dtype] / 8)
        if end - begin != want:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype} {shape} ({want} bytes) but its data "
                                  f"offsets span {end - begin} bytes; the header is corrupt")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file; it is corrupt")
    return header


class Checkpoint:
    """Which file holds each tensor, its validated header entry, and reading it (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = check_model_dir(path)
        self.file_of: dict[str, Path] = {}
        index = self.path / INDEX_FILE
        if index.exists() or index.is_symlink():
            check_regular_file(index, self.path)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            for name, fname in weight_map.items():
                if not isinstance(fname, str):
                    raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, not a file name")
                f = self.path / fname
                if not _inside(f, self.path):
                    raise CheckpointError(f"{index}: tensor {name!r} points outside the model directory ({fname})")
                if not fname.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: tensor {name!r} points to {fname}, not a .safetensors file; "
                                          f"dsv3 reads safetensors only (never pickles)")
                self.file_of[name] = f
            for f in sorted(set(self.file_of.values())):
                if not (f.exists() or f.is_symlink()):
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing from {self.path}; "
                                          f"the download is incomplete")
                check_regular_file(f, self.path)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                hint = (f" It has {', '.join(pickles[:3])}: pickle files, which dsv3 never loads because "
                        f"unpickling can run code; use a safetensors checkpoint." if pickles else "")
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}.{hint}")
            for f in files:
                check_regular_file(f, self.path)
                for name in read_safetensors_header(f):
                    if name != "__metadata__":
                        if name in self.file_of:
                            raise CheckpointError(f"{f}: tensor {name!r} is also in {self.file_of[name].name}; "
                                                  f"stray shards from another download?")
                        self.file_of[name] = f
        self.shards: list[Path] = sorted(set(self.file_of.values()))
        self.headers = {f: read_safetensors_header(f) for f in self.shards}
        for f in self.shards:   # safetensors' own checks too (e.g. gaps between tensors), before any read
            try:
                safe_open(str(f), framework="pt", device="cpu").__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{f}: safetensors rejects this file ({e}); it is corrupt") from e
        for name, f in self.file_of.items():
            if name not in self.headers[f]:
                raise CheckpointError(f"{f}: the index says it holds {name!r}, but the file has no such tensor")
        self.quant_description = self._read_quant_description()
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0   # data bytes handed out by read(): what a rank actually pulled from disk

    def _read_quant_description(self) -> dict[str, str] | None:
        """ModelSlim's quant_model_description.json: tensor name -> quant type (W8A8_DYNAMIC, FLOAT, ...)."""
        path = self.path / MODELSLIM_DESCRIPTION
        if not (path.exists() or path.is_symlink()):
            return None
        check_regular_file(path, self.path)
        try:
            desc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(desc, dict):
            raise CheckpointError(f"{path}: expected a JSON object of tensor name -> quant type")
        return desc

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def info(self, name: str) -> dict:
        return self.headers[self.file_of[name]][name]

    def shape(self, name: str) -> list[int]:
        return self.info(name)["shape"]

    def st_dtype(self, name: str) -> str:
        """The safetensors dtype string (F8_E4M3, BF16, I8, ...) from the validated header."""
        return self.info(name)["dtype"]

    def nbytes(self, name: str) -> int:
        begin, end = self.info(name)["data_offsets"]
        return end - begin

    def tensors_in(self, shard: Path) -> list[str]:
        """Names stored in `shard`, in file order (so a pass over them reads the file sequentially)."""
        return sorted((n for n in self.headers[shard] if n != "__metadata__"),
                      key=lambda n: self.headers[shard][n]["data_offsets"][0])

    def _handle(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from e
        return self._handles[f]

    def read(self, name: str, slices: tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor (or the part `slices` selects), as a CPU tensor backed by the shard's memory map:
        pages are read from disk when first touched and released when the shard is closed."""
        f = self.file_of[name]
        try:
            t = self._handle(f).get_tensor(name) if slices is None else self._handle(f).get_slice(name)[slices]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from e
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def open_shards(self) -> list[Path]:
        return list(self._handles)

    def release(self, keep: Path | None = None) -> None:
        """Close every open shard except `keep`: its memory map goes once no tensor refers to it."""
        for f in [f for f in self._handles if f != keep]:
            handle = self._handles.pop(f)
            handle.__exit__(None, None, None)

    def close(self):
        self.release()


def checkpoint_format(ckpt: Checkpoint) -> str:
    """The weight format of the big projections: fp8-block / fp8-fnuz (a weight_scale_inv beside FP8
    data), int8-w8a8 (int8 data with a weight_scale), else dense. Read from headers only."""
    for name in ckpt.names():
        if name.endswith(".weight_scale_inv"):
            data = name[: -len("_scale_inv")]
            if data in ckpt and ckpt.st_dtype(data) == "F8_E4M3FNUZ":
                return "fp8-fnuz"
            return "fp8-block"
        if name.endswith(".weight_scale"):
            data = name[: -len("_scale")]
            if data in ckpt and ckpt.st_dtype(data) == "I8":
                return "int8-w8a8"
    return "dense"


def has_mtp(ckpt: Checkpoint, num_layers: int) -> bool:
    return f"model.layers.{num_layers}.eh_proj.weight" in ckpt


def mtp_copies(cfg) -> list[tuple[str, str]]:
    """(MTP module, main module) whose tensors official checkpoints store twice, bit for bit equal: the
    MTP layer's embedding and output head (1.85 GB each at V3 size). Checkpoint prefixes, which are
    also the model's module names."""
    n = cfg.num_hidden_layers
    head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    return [(f"model.layers.{n}.embed_tokens", "model.embed_tokens"), (f"model.layers.{n}.shared_head.head", head)]


def mtp_copies_alike(ckpt: Checkpoint, cfg) -> bool:
    """From the headers alone: does each MTP copy (mtp_copies) have the tensors, shapes and dtypes of
    the main module it copies? Then the loader will share them if the data is equal too (it is in the
    official checkpoints); `dsv3-run plan` counts them once on that assumption."""
    names = ckpt.names()
    for mtp, main in mtp_copies(cfg):
        ours = {n[len(mtp):]: n for n in names if n.startswith(f"{mtp}.")}
        theirs = {n[len(main):]: n for n in names if n.startswith(f"{main}.")}
        if not ours or ours.keys() != theirs.keys() or any(
                (ckpt.shape(ours[k]), ckpt.st_dtype(ours[k])) != (ckpt.shape(theirs[k]), ckpt.st_dtype(theirs[k]))
                for k in ours):
            return False
    return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included), compared in chunks of 16M elements so
    the comparison's scratch stays small beside a 1.85 GB head."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    x, y = a.detach().reshape(-1).view(bits), b.detach().reshape(-1).view(bits)
    return all(torch.equal(p, q) for p, q in zip(x.split(1 << 24), y.split(1 << 24)))


def share_mtp_copies(model: DeepseekV3) -> list[str]:
    """After loading: point each MTP copy (mtp_copies) at the main module's parameters where every one
    holds the same bits (weight, and FP8/INT8 scales where there are any), so one storage serves both.
    Under tensor parallelism each rank compares its own vocabulary rows. Returns the MTP modules shared."""
    if not model.has_mtp:
        return []
    shared = []
    for mtp_name, main_name in mtp_copies(model.cfg):
        mtp, main = model.get_submodule(mtp_name), model.get_submodule(main_name)
        ours, theirs = dict(mtp.named_parameters(recurse=False)), dict(main.named_parameters(recurse=False))
        if ours.keys() == theirs.keys() and all(_same_bits(ours[k], theirs[k]) for k in ours):
            for k in ours:
                setattr(mtp, k, theirs[k])
            shared.append(mtp_name)
    return shared


def _unshare_mtp_copies(model: DeepseekV3) -> None:
    """Before loading into a model whose MTP copies are shared: give them their own storage again, so
    each checkpoint tensor has its own parameter to fill (the checkpoint may differ from the last)."""
    if not model.has_mtp:
        return
    for mtp_name, main_name in mtp_copies(model.cfg):
        mtp, main = model.get_submodule(mtp_name), model.get_submodule(main_name)
        for k, p in list(mtp.named_parameters(recurse=False)):
            if p is getattr(main, k, None):
                setattr(mtp, k, torch.nn.Parameter(torch.empty_like(p), requires_grad=False))


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


# -- reading one projection weight in whatever layout the checkpoint has ------------------------------

@dataclass
class WeightSource:
    """Where one projection's weight lives: `weight` plus its companions, checked against the headers.

    format: dense, fp8-block, fp8-fnuz or int8-w8a8 (ModelSlim: scale [out] or [out, 1], offset optional).
    """
    prefix: str
    format: str
    data: str
    scale: str | None = None
    offset: str | None = None

    @property
    def names(self) -> list[str]:
        return [n for n in (self.data, self.scale, self.offset) if n is not None]


def weight_source(ckpt: Checkpoint, prefix: str, out_f: int, in_f: int) -> WeightSource:
    """Find and check `prefix.weight` and its companions from headers alone (no data is read).

    out_f, in_f: the full (unsliced) shape config.json implies.
    """
    name = f"{prefix}.weight"
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing; the checkpoint does not match config.json")
    f, dtype, shape = ckpt.file_of[name], ckpt.st_dtype(name), ckpt.shape(name)
    if shape != [out_f, in_f]:
        raise CheckpointError(f"{f}: tensor {name!r} has shape {shape}, config.json implies {[out_f, in_f]}")
    desc = ckpt.quant_description
    if dtype in _FLOAT_DTYPES:
        if desc is not None and desc.get(name, "FLOAT") != "FLOAT":
            raise CheckpointError(f"{f}: tensor {name!r} is {dtype} but {MODELSLIM_DESCRIPTION} says "
                                  f"{desc[name]}; the checkpoint and its description disagree")
        return WeightSource(prefix, "dense", name)
    if dtype in ("F8_E4M3", "F8_E4M3FNUZ"):
        src = WeightSource(prefix, "fp8-block" if dtype == "F8_E4M3" else "fp8-fnuz", name, f"{prefix}.weight_scale_inv")
        want = list(scale_shape(src.format, out_f, in_f))
        _check_companion(ckpt, src.scale, name, want, f"{dtype} weights need a float32 scale per 128x128 block")
        return src
    if dtype == "I8":
        kind = None if desc is None else desc.get(name)
        if kind is not None and kind not in MODELSLIM_W8A8:
            raise CheckpointError(f"{f}: tensor {name!r} has ModelSlim quant type {kind!r}; dsv3 reads "
                                  f"{' / '.join(MODELSLIM_W8A8)} (int8 weight, per-channel weight_scale)")
        if f"{prefix}.weight_scale" not in ckpt and f"{prefix}.deq_scale" in ckpt:
            raise CheckpointError(f"{f}: {name!r} is in ModelSlim's static W8A8 layout (deq_scale, input_scale); "
                                  f"dsv3 runs dynamic per-token activations and reads W8A8_DYNAMIC "
                                  f"(weight_scale, weight_offset). Quantise with ModelSlim's dynamic mode, or "
                                  f"convert the BF16/FP8 checkpoint with `dsv3-run convert --to int8-w8a8`")
        src = WeightSource(prefix, "int8-w8a8", name, f"{prefix}.weight_scale")
        _check_companion(ckpt, src.scale, name, [out_f], "int8 weights need a per-output-channel scale",
                         also=[out_f, 1])
        if f"{prefix}.weight_offset" in ckpt:
            src.offset = f"{prefix}.weight_offset"
            _check_companion(ckpt, src.offset, name, [out_f], "", also=[out_f, 1])
        return src
    raise CheckpointError(f"{f}: tensor {name!r} is {dtype}; a projection weight must be BF16/FP16/FP32, "
                          f"F8_E4M3(FNUZ) with weight_scale_inv, or I8 with weight_scale")


def _check_companion(ckpt: Checkpoint, name: str, owner: str, shape: list[int], why: str,
                     also: list[int] | None = None) -> None:
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.file_of[owner]}: {ckpt.st_dtype(owner)} tensor {owner!r} has no "
                              f"{name!r}; {why}")
    f = ckpt.file_of[name]
    if ckpt.st_dtype(name) not in _FLOAT_DTYPES:
        raise CheckpointError(f"{f}: tensor {name!r} is {ckpt.st_dtype(name)}; scales must be floating point")
    if ckpt.shape(name) not in (shape, also):
        raise CheckpointError(f"{f}: tensor {name!r} has shape {ckpt.shape(name)}, expected {shape} for the "
                              f"{ckpt.shape(owner)} weight {owner!r}")


def companion_slices(src: WeightSource, slices: tuple[slice, ...] | None,
                     full: tuple[int, int]) -> dict[str, tuple[slice, ...] | None]:
    """The slice of each companion that goes with the weight slice `slices` ([rows, cols]).

    FP8 block scales follow the 128x128 grid, so a sliced FP8 weight must start on a block boundary
    (and end on one, or at the edge); per-channel scales follow the rows.
    """
    if slices is None:
        return {n: None for n in src.names}
    rows, cols = (tuple(slices) + (slice(None),) * 2)[:2]
    out = {src.data: (rows, cols)}
    if src.format in ("fp8-block", "fp8-fnuz"):
        blocks = []
        for s, n in ((rows, full[0]), (cols, full[1])):
            a, b, _ = s.indices(n)
            if a % BLOCK or (b % BLOCK and b != n):
                raise CheckpointError(f"slice [{a}:{b}] of {src.data!r} (dim {n}) does not follow the 128x128 "
                                      f"FP8 scale blocks; shard FP8 weights on multiples of 128")
            blocks.append(slice(a // BLOCK, -(-b // BLOCK)))
        out[src.scale] = tuple(blocks)
    elif src.format == "int8-w8a8":
        for n in (src.scale, src.offset):
            if n is not None:
                out[n] = (rows,)   # [out] or [out, 1]: the rows the rank keeps
    return out


def read_weight(ckpt: Checkpoint, src: WeightSource, slices: tuple[slice, ...] | None = None) -> "RawWeight":
    """The stored tensors of one projection (memory-mapped views; nothing converted yet)."""
    parts = companion_slices(src, slices, tuple(ckpt.shape(src.data)))
    get = {n: ckpt.read(n, parts[n]) for n in src.names}
    scale = get.get(src.scale)
    offset = get.get(src.offset)
    if src.format == "int8-w8a8":
        scale = scale.float().flatten()
        offset = offset.float().flatten() if offset is not None else None
        if offset is not None and not offset.any():
            offset = None   # symmetric: ModelSlim writes zeros
    elif scale is not None:
        scale = scale.float()
    return RawWeight(get[src.data], scale, offset, src.format)


@dataclass
class RawWeight:
    """data [out, in] as stored; scale per format; offset only for asymmetric int8: real = (q - offset) * scale."""
    data: torch.Tensor
    scale: torch.Tensor | None
    offset: torch.Tensor | None
    format: str

    def rows(self, r0: int, r1: int) -> "RawWeight":
        """Rows r0:r1 (r0 a multiple of 128 for FP8) with the scale rows that cover them."""
        if self.format in ("fp8-block", "fp8-fnuz"):
            scale = self.scale[r0 // BLOCK: -(-r1 // BLOCK)]
        elif self.format == "int8-w8a8":
            scale = self.scale[r0:r1]
        else:
            scale = None
        offset = None if self.offset is None else self.offset[r0:r1]
        return RawWeight(self.data[r0:r1], scale, offset, self.format)

    def to(self, device) -> "RawWeight":
        move = (lambda t: None if t is None else t.to(device))
        return RawWeight(move(self.data), move(self.scale), move(self.offset), self.format)

    def quant(self) -> QuantWeight:
        if self.offset is not None:   # asymmetric ModelSlim int8: no symmetric QuantWeight holds it exactly
            real = (self.data.float() - self.offset.unsqueeze(-1)) * self.scale.unsqueeze(-1)
            return QuantWeight(real, None, "dense")
        return QuantWeight(self.data, self.scale, self.format)


def chunk_rows(out_f: int, in_f: int, budget: int = 1 << 24) -> int:
    """Rows per conversion chunk: ~16M elements (so float32 scratch stays ~64 MB a buffer), whole
    128-row blocks so FP8 block scales never straddle a chunk."""
    return max(BLOCK, (budget // max(in_f, 1)) // BLOCK * BLOCK)


def has_nonfinite(t: torch.Tensor) -> bool:
    """Does `t` hold a NaN or an Inf? Checked in chunks on t's device, so scratch stays small. Float8
    is checked by bit pattern: e4m3fn has no Inf and NaN is 0x7F / 0xFF; e4m3fnuz's only NaN is 0x80."""
    if t.dtype == torch.float8_e4m3fn:
        def bad(c):
            return ((c.view(torch.uint8) & 0x7F) == 0x7F).any()
    elif t.dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        def bad(c):
            return (c.view(torch.uint8) == 0x80).any()
    elif t.dtype == torch.float8_e5m2:
        def bad(c):
            return ((c.view(torch.uint8) & 0x7C) == 0x7C).any()
    elif t.dtype.is_floating_point:
        def bad(c):
            return ~torch.isfinite(c).all()
    else:
        return False
    return any(bool(bad(c)) for c in t.reshape(-1).split(1 << 24))


def _nonfinite_error(where: str, source_bad: bool, dtype: torch.dtype) -> CheckpointError:
    if source_bad:
        return CheckpointError(f"{where} holds NaN or Inf values; the checkpoint is corrupt (a model with them "
                               f"generates nothing). Download it again, or re-export or re-convert it")
    name = str(dtype).removeprefix("torch.")
    return CheckpointError(f"{where} has values beyond {name}'s range, which become Inf; run in a wider dtype "
                           f"(--dtype bfloat16 or float32)")


def convert_into(raw: RawWeight, fmt: str, dtype: torch.dtype, ue8m0: bool, data_out: torch.Tensor,
                 scale_out: torch.Tensor | None, requantize: bool = False,
                 check: tuple[str | None, ...] | None = None) -> None:
    """Convert `raw` to `fmt` chunk by chunk, writing straight into data_out [out, in] and scale_out
    (a parameter or an output buffer, on any device). Each chunk moves to data_out's device first,
    so a GPU does the arithmetic when the target is one. Chunks are whole 128-row blocks and every
    conversion is row-local, so the result is bit-identical to converting the tensor at once.
    requantize: go through float32 even when the format already matches (e.g. new ue8m0 scales).
    check: where the data, scale and offset come from ("FILE: tensor NAME", None if absent); when given,
    each chunk's stored values are checked for NaN/Inf on the device, and a dense result for overflow."""
    out_f, in_f = raw.data.shape
    step = chunk_rows(out_f, in_f)
    fp8_out = fmt in ("fp8-block", "fp8-fnuz")
    for r0 in range(0, out_f, step):
        r1 = min(r0 + step, out_f)
        chunk = raw.rows(r0, r1).to(data_out.device)
        for where, t in zip(check or (), (chunk.data, chunk.scale, chunk.offset)):
            if t is not None and has_nonfinite(t):
                raise _nonfinite_error(where, True, dtype)
        q = chunk.quant()
        if requantize and q.format != "dense":
            q = QuantWeight(dequantize(q, torch.float32), None, "dense")
        q = convert_weight(q, fmt, dtype, ue8m0)
        data_out[r0:r1].copy_(q.data)
        if check and fmt == "dense" and has_nonfinite(data_out[r0:r1]):
            raise _nonfinite_error(check[0], False, data_out.dtype)
        if scale_out is not None:
            if fp8_out:
                scale_out[r0 // BLOCK: -(-r1 // BLOCK)].copy_(q.scale.view(-1, scale_out.shape[-1]))
            else:
                scale_out[r0:r1].copy_(q.scale.view(scale_out[r0:r1].shape))


# -- the load plan: which checkpoint tensors fill which parameter, checked before any data is read ----

@dataclass
class _Unit:
    """One read: a projection (weight + companions) or a plain parameter, and where it goes."""
    key: str                                 # the checkpoint name of its main tensor
    names: list[str]
    nbytes: int                              # bytes this rank reads (after slicing)
    linear: Linear | None = None
    index: int | None = None                 # expert slot in a stacked [E, ...] parameter
    source: WeightSource | None = None
    param: torch.nn.Parameter | None = None
    slices: tuple[slice, ...] | None = None
    order: tuple = field(default=(), repr=False)


def _apply_slices(shape: list[int], slices: tuple[slice, ...] | None) -> list[int]:
    if slices is None:
        return list(shape)
    if len(slices) > len(shape):
        raise CheckpointError(f"slicer returned {len(slices)} slices for a {len(shape)}-d tensor")
    out = []
    for i, n in enumerate(shape):
        s = slices[i] if i < len(slices) else slice(None)
        a, b, step = s.indices(n)
        if step != 1:
            raise CheckpointError(f"slicer returned a strided slice {s}; ranks keep contiguous ranges")
        out.append(max(b - a, 0))
    return out


def _slice_nbytes(ckpt: Checkpoint, name: str, slices) -> int:
    full = ckpt.shape(name)
    return ckpt.nbytes(name) * math.prod(_apply_slices(full, slices)) // max(math.prod(full), 1)


def plan_load(model: DeepseekV3, ckpt: Checkpoint, slicer: Slicer | None = None) -> tuple[list[_Unit], set[str]]:
    """Every read the model needs, validated against the headers, in file order; and the names read."""
    units: list[_Unit] = []
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for prefix, lin in linears.items():
        out_f, in_f = lin.weight.shape[-2:]
        if lin.weight.dim() == 3:   # stacked experts: checkpoint has experts.{e}.<proj>
            experts = model.get_submodule(prefix.rsplit(".", 1)[0])
            base, proj = prefix.rsplit(".", 1)
            targets = [(expert_prefix(base, experts.first_expert + e, proj), e) for e in range(lin.weight.shape[0])]
        else:
            targets = [(prefix, None)]
        for src_prefix, e in targets:
            name = f"{src_prefix}.weight"
            full = ckpt.shape(name) if name in ckpt else [out_f, in_f]
            slices = slicer(name, tuple(full)) if slicer else None
            if slices is not None and name in ckpt and _apply_slices(full, slices) != [out_f, in_f]:
                raise CheckpointError(f"{ckpt.file_of[name]}: tensor {name!r} {full} sliced by {slices} gives "
                                      f"{_apply_slices(full, slices)}, but the model's parameter is {[out_f, in_f]}")
            src = weight_source(ckpt, src_prefix, *(full if slices is not None else (out_f, in_f)))
            parts = companion_slices(src, slices, tuple(full))
            units.append(_Unit(name, src.names, sum(_slice_nbytes(ckpt, n, parts[n]) for n in src.names),
                               linear=lin, index=e, source=src, slices=slices))
    covered = tuple(f"{p}." for p in linears)
    for name, p in model.named_parameters():
        if name.startswith(covered):
            continue
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing; the checkpoint does not match "
                                  f"config.json")
        full = ckpt.shape(name)
        slices = slicer(name, tuple(full)) if slicer else None
        if _apply_slices(full, slices) != list(p.shape):
            implied = "config.json implies" if slices is None else f"sliced by {slices} it must be"
            raise CheckpointError(f"{ckpt.file_of[name]}: tensor {name!r} has shape {full}, {implied} "
                                  f"{list(p.shape)}")
        if ckpt.st_dtype(name) not in _FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.file_of[name]}: tensor {name!r} is {ckpt.st_dtype(name)}; this "
                                  f"parameter must be floating point (BF16/FP16/FP32)")
        units.append(_Unit(name, [name], _slice_nbytes(ckpt, name, slices), param=p, slices=slices))
    shard_index = {f: i for i, f in enumerate(ckpt.shards)}
    for u in units:
        u.order = (shard_index[ckpt.file_of[u.key]], ckpt.info(u.key)["data_offsets"][0])
    units.sort(key=lambda u: u.order)
    return units, {n for u in units for n in u.names}


def _not_held(model: DeepseekV3, num_layers: int) -> Callable[[str], bool]:
    """Names this model may leave unread: the MTP layer when not running it, rotary caches some
    exporters save, and routed experts another rank holds."""
    held = {name: range(m.first_expert, m.first_expert + m.gate_proj.weight.shape[0])
            for name, m in model.named_modules() if isinstance(m, Experts)}

    def skippable(name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq"):
            return True
        if not model.has_mtp and name.startswith(f"model.layers.{num_layers}."):
            return True
        expert = parse_expert_tensor_name(name)
        return bool(expert and expert[0] in held and expert[1] not in held[expert[0]])
    return skippable


def check_unused(model: DeepseekV3, ckpt: Checkpoint, used: set[str]) -> list[str]:
    """Fail on checkpoint tensors the model neither reads nor may skip; return the skipped ones."""
    skippable = _not_held(model, model.cfg.num_hidden_layers)
    rest = [n for n in ckpt.names() if n not in used]
    unused = [n for n in rest if not skippable(n)]
    if unused:
        raise CheckpointError(f"{ckpt.file_of[unused[0]]}: {len(unused)} tensor(s) the model does not use, e.g. "
                              f"{unused[0]!r}; config.json and the checkpoint disagree")
    return rest


def load_weights(model: DeepseekV3, ckpt: Checkpoint, progress: bool | None = None, ue8m0: bool = False,
                 *, slicer: Slicer | None = None) -> None:
    """Fill every parameter of `model` from `ckpt`, converting formats as needed, streaming.

    The whole plan is checked against the headers first (missing tensors, wrong shapes or dtypes,
    tensors the model does not know: errors that name file and tensor); then shards are read in
    order, one mapped at a time, each tensor moved to the parameter's device and converted there,
    and checked there for NaN/Inf (and for overflow of the run dtype), chunk by chunk.

    slicer: for tensor/expert parallelism. Called as slicer(name, full_shape) for each checkpoint
      tensor this model reads (checkpoint names, experts unstacked: `...experts.17.up_proj.weight`);
      returns the slices (one per dim, contiguous) this rank keeps, or None for all of it. The model
      must have been built with the sliced shapes. Scales follow their weight automatically (FP8:
      slices must sit on the 128-block grid). Which experts a rank holds comes from the model itself
      (`Experts.first_expert` and its local count); other experts are neither read nor reported.
    progress: bytes, GB/s and ETA on stderr; None = only when stderr is a terminal.

    Afterwards the MTP layer's embedding and head share the main model's storage where the checkpoint
    stores them equal (share_mtp_copies); both copies are resident only while loading.
    """
    _unshare_mtp_copies(model)
    units, used = plan_load(model, ckpt, slicer)
    check_unused(model, ckpt, used)
    shown = Progress(sum(u.nbytes for u in units), "loading", enabled=progress, shards=len(ckpt.shards))
    shard = None
    with torch.no_grad():
        for u in units:
            f = ckpt.file_of[u.key]
            if f != shard:
                ckpt.release()             # unmap the previous shard before touching the next
                shard = f
                shown.shard(ckpt.shards.index(f) + 1)
            if u.linear is not None:
                raw = read_weight(ckpt, u.source, u.slices)
                lin = u.linear
                data_out = lin.weight if u.index is None else lin.weight[u.index]
                scale = getattr(lin, lin.scale_name, None)
                scale_out = None if scale is None else (scale if u.index is None else scale[u.index])
                check = tuple(n and f"{ckpt.file_of[n]}: tensor {n!r}"
                              for n in (u.source.data, u.source.scale, u.source.offset))
                convert_into(raw, lin.format, model.dtype, ue8m0, data_out, scale_out, check=check)
            else:
                raw = ckpt.read(u.key, u.slices)
                u.param.copy_(raw)         # copy_ casts and moves in one pass, no full-size temporary
                if has_nonfinite(u.param):
                    raise _nonfinite_error(f"{f}: tensor {u.key!r}", has_nonfinite(raw), u.param.dtype)
            del raw
            ckpt.release(keep=shard)       # a companion read from another shard is unmapped at once
            shown.update(u.nbytes)
    ckpt.release()
    shown.close()
    share_mtp_copies(model)                # before prepare_weights, which may take the freed memory
    model.prepare_weights()                # the absorbed MLA weights, from the kv_b just loaded


class Progress:
    """Bytes done, GB/s and ETA on stderr, redrawn at most 10 times a second; silent unless stderr
    is a terminal (or enabled=True)."""

    def __init__(self, total_bytes: int, label: str, enabled: bool | None = None, shards: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.label, self.shards, self.current = total_bytes, 0, label, shards, 0
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()

    def shard(self, i: int) -> None:
        self.current = i

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.1 or self.done >= self.total):
            self.last = now
            self.stream.write("\r" + self.line(now) + " " * 4)
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = "--:--" if not math.isfinite(eta) else f"{int(eta) // 60:d}:{int(eta) % 60:02d}"
        shard = f"  shard {self.current}/{self.shards}" if self.shards else ""
        return (f"{self.label} {self.done / 1e9:6.2f}/{self.total / 1e9:.2f} GB  {rate / 1e9:5.2f} GB/s  "
                f"ETA {eta_s}{shard}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


def expected_tensors(model: DeepseekV3) -> dict[str, tuple[list[int], torch.dtype]]:
    """Checkpoint name -> (shape, dtype) this model reads: the official layout, experts unstacked."""
    out = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if stacked := parse_stacked_expert_name(name):
            experts, proj, tensor = stacked
            first = model.get_submodule(experts).first_expert
            for e in range(p.shape[0]):
                out[expert_tensor_name(experts, first + e, proj, tensor)] = (list(p.shape[1:]), p.dtype)
        else:
            out[name] = (list(p.shape), p.dtype)
    return out
