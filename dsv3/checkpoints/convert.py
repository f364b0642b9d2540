"""`dsv3-run convert`: change a checkpoint's weight format on any machine, with bounded memory.

    bf16       dequantise FP8 (or INT8) projections to BF16; the official converter needs a Hopper GPU
    fp8-block  float8_e4m3fn + float32 weight_scale_inv per 128x128 block (optionally UE8M0 scales, V3.1)
    fp8-fnuz   float8_e4m3fnuz for AMD MI300: from fp8-block exactly (same bits, scale doubled)
    int8-w8a8  Ascend, ModelSlim W8A8_DYNAMIC layout: int8 weight, float32 weight_scale [out, 1] and
               weight_offset [out, 1] (zeros: symmetric), quant_model_description.json naming each
               tensor's quant type; activations are quantised per token at run time

Only the projections the official checkpoint stores in FP8 change format (attention, dense MLP,
shared and routed experts, MTP layer included); embeddings, norms, the router, eh_proj and the
heads are copied (cast to BF16 for `--to bf16`).

How it stays safe and small:
- Everything is validated from headers first (the same plan `load_weights` uses): a hostile or
  mismatched checkpoint fails before anything is written.
- One conversion per DST at a time: `.<DST>.lock` next to DST is locked before anything is read or
  removed, so a second command fails at once and leaves the first one's work alone.
- Output goes to `.<DST>.partial/` next to DST and is renamed to DST only when complete. Each shard
  is written under a temporary name, then renamed and recorded, with its SHA-256, in a state file;
  re-running the same command resumes with the finished shards whose checksum still matches (a
  shard changed on disk is converted again); a different command or a changed source restarts.
  The state file stays until DST is in place, so a kill at any point before then resumes.
- A full disk (or any other write error) stops with a message and keeps the finished shards.
- `--overwrite` moves the old DST to `.<DST>.old-PID`, the new one into place, then deletes the
  old one; a run killed in between leaves the old DST there, and the next run puts it back first.
- Source shards are read in order from their memory maps; each tensor is converted in row chunks
  into one output buffer and streamed to disk (our own safetensors writer: the header is known from
  the plan), so host memory is about one source shard's pages plus one tensor.
- Every converted tensor is compared with its float64 dequantised source (max and RMS relative
  error, per tensor class); a tensor beyond its format's bound (BOUNDS) stops the conversion.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3.core.config import ModelConfig
from dsv3.core.errors import Dsv3Error
from dsv3.core.loader import (INDEX_FILE, MODELSLIM_DESCRIPTION, PICKLE_SUFFIXES, Checkpoint, Progress, RawWeight,
                              check_regular_file, check_unused, convert_into, has_mtp, parse_expert_tensor_name,
                              plan_load, read_weight)
from dsv3.core.weights import BLOCK, QuantWeight, dequantize, scale_shape

TARGETS = ("bf16", "fp8-block", "fp8-fnuz", "int8-w8a8")
_FORMAT = {"bf16": "dense", "fp8-block": "fp8-block", "fp8-fnuz": "fp8-fnuz", "int8-w8a8": "int8-w8a8"}
_ST_NAME = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.int8: "I8"}
_TORCH = {v: k for k, v in _ST_NAME.items()}
DEFAULT_SHARD_BYTES = 5 * 10**9
STATE_FILE = ".dsv3-convert-state.json"
_VERSION = 1

# Largest error a converted tensor may have against its float64 dequantised source, as
# (max |y - x| / max |x|, ||y - x||_2 / ||x||_2) over the tensor, with 0.1% slack for the float32
# arithmetic in between:
#   bf16   round to nearest with 8 significant bits: every element within 2^-8 of itself
#   fp8    e4m3 keeps 4 significant bits: within 2^-4 of itself in the normal range, and the largest
#          absolute error in a block is < amax/16 even with UE8M0 scales (scaled amax in (224, 448])
#   int8   per-row step amax/127, round to nearest: |error| <= amax/254. The RMS bound is not a
#          theorem (a row with one outlier has a coarse step for all its small values); 2^-4 is
#          far above what real or random weights give (~1%) and far below a broken conversion.
#   exact  copies, and e4m3fn -> e4m3fnuz (same bits, scale doubled)
BOUNDS = {"bf16": (2**-8 * 1.001, 2**-8 * 1.001), "fp8": (2**-4 * 1.001, 2**-4 * 1.001),
          "int8": (1 / 254 * 1.001, 2**-4), "exact": (0.0, 0.0)}


class ConversionError(Dsv3Error):
    """A conversion cannot start, or its result fails verification."""


# -- what gets written ----------------------------------------------------------------------------

@dataclass
class TensorSpec:
    """One tensor of an output file: what the writer's header promises."""
    name: str
    dtype: torch.dtype
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Job:
    """One source unit (a projection with its companions, or a plain tensor) and what it becomes."""
    unit: object                    # loader._Unit
    outputs: list[TensorSpec]
    kind: str                       # key of BOUNDS
    projection: bool                # one of the projections the target format applies to
    quantized: bool                 # ... and its stored format changes (or it is requantised)
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


def tensor_class(name: str) -> str:
    """Group tensors for the report: layer and expert indices dropped, `.weight` stripped."""
    if expert := parse_expert_tensor_name(name):
        name = f"{expert[0]}.{expert[2]}.{expert[3]}"
    name = re.sub(r"^model\.layers\.\d+\.", "layers.", name)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _plan(ckpt: Checkpoint, cfg: ModelConfig, to: str, ue8m0: bool, source_ue8m0: bool):
    """Validate the source against config.json (headers only) and list the output tensors."""
    from dsv3.backends.reference.ops import OPS
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    with_mtp = cfg.num_nextn_predict_layers > 0 and has_mtp(ckpt, cfg.num_hidden_layers)
    with torch.device("meta"):   # no memory: only names, shapes and which projections are quantisable
        model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "fp8-block", torch.bfloat16, with_mtp=with_mtp)
    units, used = plan_load(model, ckpt)
    dropped = check_unused(model, ckpt, used)
    fmt = _FORMAT[to]
    jobs = []
    for u in units:
        if u.linear is not None and u.linear.format != "dense":   # a projection the format applies to
            src = u.source
            out_f, in_f = ckpt.shape(src.data)
            prefix = src.prefix
            # requantise fp8-block -> fp8-block only to change the scale format
            same = src.format == fmt and src.offset is None and not (fmt == "fp8-block" and ue8m0 and not source_ue8m0)
            if fmt == "dense":
                outs, kind = [TensorSpec(src.data, torch.bfloat16, [out_f, in_f])], "bf16"
            elif fmt in ("fp8-block", "fp8-fnuz"):
                dt = torch.float8_e4m3fn if fmt == "fp8-block" else torch.float8_e4m3fnuz
                outs = [TensorSpec(src.data, dt, [out_f, in_f]),
                        TensorSpec(f"{prefix}.weight_scale_inv", torch.float32, list(scale_shape(fmt, out_f, in_f)))]
                kind = "exact" if same or (src.format == "fp8-block" and fmt == "fp8-fnuz") else "fp8"
            else:
                outs = [TensorSpec(src.data, torch.int8, [out_f, in_f]),
                        TensorSpec(f"{prefix}.weight_scale", torch.float32, [out_f, 1]),
                        TensorSpec(f"{prefix}.weight_offset", torch.float32, [out_f, 1])]
                kind = "exact" if same else "int8"
            if src.format == "dense" and fmt == "dense" and ckpt.st_dtype(src.data) == "BF16":
                kind = "exact"
            jobs.append(_Job(u, outs, kind, projection=True, quantized=not same))
        else:   # copied; BF16 output casts floating tensors except the router's float32 bias
            st = ckpt.st_dtype(u.key)
            cast = to == "bf16" and st in ("F32", "F16", "F64") and not u.key.endswith("e_score_correction_bias")
            dtype = torch.bfloat16 if cast else _TORCH[st]
            jobs.append(_Job(u, [TensorSpec(u.key, dtype, ckpt.shape(u.key))], "bf16" if cast else "exact",
                             projection=False, quantized=False))
    return jobs, dropped, with_mtp


def _assign_shards(jobs: list[_Job], max_bytes: int) -> int:
    """Pack jobs, in source order, into output shards of at most max_bytes (a job is never split)."""
    shard, size = 0, 0
    for j in jobs:
        if size and size + j.nbytes > max_bytes:
            shard, size = shard + 1, 0
        j.shard = shard
        size += j.nbytes
    return shard + 1


# -- a streaming safetensors writer -----------------------------------------------------------------

class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known up front, so only one tensor is in memory at a time. The format: an 8-byte little-endian
    header length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes in order."""

    def __init__(self, path: Path, outputs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.outputs, self.i = path, outputs, 0
        header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
        for o in outputs:
            header[o.name] = {"dtype": _ST_NAME[o.dtype], "shape": o.shape, "data_offsets": [offset, offset + o.nbytes]}
            offset += o.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self.sha256 = hashlib.sha256()   # of the bytes written, recorded so a resume can check the file
        self.f = open(path, "wb")
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data) -> None:
        self.f.write(data)
        self.sha256.update(data)

    def write(self, name: str, t: torch.Tensor) -> None:
        o = self.outputs[self.i]
        if name != o.name or t.dtype != o.dtype or list(t.shape) != o.shape:
            raise AssertionError(f"writer expected {o}, got {name} {t.dtype} {list(t.shape)}")  # a bug, not input
        self._put(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.outputs):
            raise AssertionError(f"{self.path}: {len(self.outputs) - self.i} tensors were never written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# -- verification ----------------------------------------------------------------------------------

@dataclass
class ClassStats:
    tensors: int = 0
    max_rel: float = 0.0      # max over tensors of max|y - x| / max|x|
    err2: float = 0.0         # sum (y - x)^2 over the class
    ref2: float = 0.0         # sum x^2 over the class
    bound: tuple[float, float] = (0.0, 0.0)

    @property
    def rms_rel(self) -> float:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else math.inf)

    def add(self, max_rel: float, err2: float, ref2: float, bound) -> None:
        self.tensors += 1
        self.max_rel = max(self.max_rel, max_rel)
        self.err2 += err2
        self.ref2 += ref2
        self.bound = max(self.bound, tuple(bound))


def _real(w: RawWeight, r0: int, r1: int, device) -> torch.Tensor:
    """Rows r0:r1 of the real-valued weight, in float64 on `device`."""
    c = w.rows(r0, r1).to(device)
    if c.offset is not None:
        return (c.data.double() - c.offset.double().unsqueeze(-1)) * c.scale.double().unsqueeze(-1)
    return dequantize(QuantWeight(c.data, c.scale, c.format), torch.float64)


def error_stats(src: RawWeight, out: RawWeight) -> tuple[float, float, float]:
    """(max|y - x| / max|x|, sum (y - x)^2, sum x^2) of out against src, float64, in row chunks."""
    from dsv3.core.loader import chunk_rows
    n_rows, n_cols = src.data.shape
    max_err = max_ref = err2 = ref2 = 0.0
    step = chunk_rows(n_rows, n_cols, budget=1 << 22)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        x = _real(src, r0, r1, out.data.device)
        d = _real(out, r0, r1, out.data.device) - x
        max_err = max(max_err, float(d.abs().max()))
        max_ref = max(max_ref, float(x.abs().max()))
        err2 += float(d.square().sum())
        ref2 += float(x.square().sum())
    max_rel = max_err / max_ref if max_ref > 0 else (0.0 if max_err == 0 else math.inf)
    if not all(math.isfinite(v) for v in (max_err, max_ref, err2, ref2)):
        max_rel = math.nan
    return max_rel, err2, ref2


# -- the conversion ---------------------------------------------------------------------------------

@dataclass
class ConvertReport:
    dst: Path
    to: str
    stats: dict[str, ClassStats]
    source_bytes: int
    output_bytes: int
    seconds: float
    shards_written: int
    shards_resumed: int
    dropped: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'tensor class':44} {'n':>5} {'max rel err':>12} {'rms rel err':>12}  bound (max / rms)"]
        for cls in sorted(self.stats):
            s = self.stats[cls]
            rows.append(f"{cls:44} {s.tensors:5d} {s.max_rel:12.3e} {s.rms_rel:12.3e}  "
                        f"{s.bound[0]:.3e} / {s.bound[1]:.3e}")
        return "\n".join(rows)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '4GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 4GiB")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    mult = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
            "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size < 2**20:
        raise ConversionError(f"--max-shard-size {text!r} is below 1 MiB; use e.g. 5GB")
    return size


def _fingerprint(src: Checkpoint, to: str, ue8m0: bool, max_bytes: int) -> str:
    parts = {"version": _VERSION, "src": str(src.path.resolve()), "to": to, "ue8m0": ue8m0, "max_bytes": max_bytes,
             "config": hashlib.sha256((src.path / "config.json").read_bytes()).hexdigest(),
             "shards": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.shards]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _output_config(raw: dict, to: str, ue8m0_out: bool) -> dict:
    config = {k: v for k, v in raw.items() if k not in ("quantization_config", "quantize")}
    if to in ("fp8-block", "fp8-fnuz"):
        config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3" if to == "fp8-block" else "e4m3fnuz",
            "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
            **({"scale_fmt": "ue8m0"} if ue8m0_out else {})}
    elif to == "int8-w8a8":
        config["quantize"] = "w8a8_dynamic"   # MindIE / ModelSlim's key; the tensors' types are in the description
    return config


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _side_files(src: Path) -> list[Path]:
    """Tokenizer, generation config, README... everything but weights and what convert rewrites. Each is
    checked as the loader checks a checkpoint's files: a link out of the directory (a tokenizer.json
    pointing at /etc/passwd, say) is refused, not copied, and so is anything but a regular file."""
    skip = {INDEX_FILE, "config.json", MODELSLIM_DESCRIPTION}
    files = sorted(p for p in src.iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
                   and p.name not in skip and p.suffix not in (".safetensors",) + PICKLE_SUFFIXES)
    for f in files:
        check_regular_file(f, src)
    return files


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, *, ue8m0: bool = False, device: str = "cpu",
                       overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       progress: bool | None = None, log=print) -> ConvertReport:
    """Convert the checkpoint at `src` to format `to` in a new directory `dst`; see the module doc."""
    t0 = time.monotonic()
    if to not in TARGETS:
        raise ConversionError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if ue8m0 and to != "fp8-block":
        raise ConversionError("--ue8m0 applies to --to fp8-block (power-of-two block scales, as in V3.1)")
    dev = _device(device)
    if not Path(src).expanduser().is_dir():
        raise ConversionError(f"{src}: no such directory; SRC is the DeepSeek-V3 HF checkpoint directory to convert")
    dst = Path(dst).expanduser().absolute()
    ckpt = Checkpoint(src)
    src_dir = ckpt.path.resolve()
    if dst.resolve() == src_dir or src_dir in dst.resolve().parents or dst.resolve() in src_dir.parents:
        raise ConversionError(f"{dst}: the output must be a new directory outside the source {src_dir}")
    if not dst.parent.is_dir():
        raise ConversionError(f"{dst.parent}: no such directory to create {dst.name} in")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file, not a checkpoint directory; --overwrite replaces only a directory: "
                              f"remove the file or choose another DST")
    cfg = ModelConfig.from_file(ckpt.path / "config.json")    # a clear error for a broken config.json
    raw_config = json.loads((ckpt.path / "config.json").read_text())
    side_files = _side_files(ckpt.path)                       # refused now, before any work, if one links out

    part = dst.with_name(f".{dst.name}.partial")
    try:
        # locked before anything next to DST is read or removed
        with _locked(dst), contextlib.closing(ckpt):
            _recover_overwrite(dst, log)
            if dst.exists() and not overwrite:
                raise ConversionError(f"{dst} already exists; pass --overwrite to replace it, or choose another "
                                      f"directory")
            source_ue8m0 = bool(cfg.quantization and cfg.quantization.scale_fmt == "ue8m0")
            jobs, dropped, with_mtp = _plan(ckpt, cfg, to, ue8m0, source_ue8m0)
            n_shards = _assign_shards(jobs, max_shard_bytes)
            names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
            out_bytes = sum(j.nbytes for j in jobs)
            state = _resume_state(part, _fingerprint(ckpt, to, ue8m0, max_shard_bytes), n_shards, log)
            done_bytes = sum((part / k).stat().st_size for k in state["shards"])
            free = shutil.disk_usage(dst.parent).free
            if out_bytes - done_bytes > free:
                raise ConversionError(f"{dst.parent}: {free / 1e9:.1f} GB free, the {to} checkpoint needs "
                                      f"{(out_bytes - done_bytes) / 1e9:.1f} GB more")
            part.mkdir(exist_ok=True)
            for p in part.iterdir():   # half-written shards of an interrupted run
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.name not in state["shards"] and p.name != STATE_FILE:
                    p.unlink()
            try:
                stats, written = _write_shards(ckpt, jobs, names, part, state, to, ue8m0, dev, progress)
            except ConversionError:
                shutil.rmtree(part, ignore_errors=True)   # a tensor failed verification: nothing here is trustworthy
                raise
            ue8m0_out = ue8m0 or (source_ue8m0 and to in ("fp8-block", "fp8-fnuz") and
                                  all(j.kind == "exact" for j in jobs if j.projection))
            weight_map = {o.name: names[j.shard] for j in jobs for o in j.outputs}
            _write_json(part / INDEX_FILE, {"metadata": {"total_size": out_bytes}, "weight_map": weight_map})
            _write_json(part / "config.json", _output_config(raw_config, to, ue8m0_out))
            if to == "int8-w8a8":
                desc = {"model_quant_type": "W8A8_DYNAMIC"}
                desc.update({o.name: "W8A8_DYNAMIC" if j.projection else "FLOAT" for j in jobs for o in j.outputs})
                _write_json(part / MODELSLIM_DESCRIPTION, desc)
            for f in side_files:
                shutil.copy2(f, part / f.name)
            _swap_in(part, dst)
    except OSError as e:   # a full disk, a read-only directory, ...: keep what is finished
        for p in part.glob("*.incomplete"):
            p.unlink(missing_ok=True)
        where = e.filename or dst.parent
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(dst.parent).free
            raise ConversionError(f"{where}: no space left on the device ({free / 1e9:.1f} GB free); the finished "
                                  f"shards are kept in {part}: free some space and run the same command again "
                                  f"to resume") from e
        raise ConversionError(f"{where}: {e.strerror or e}; the finished shards (if any) are kept in {part}: fix "
                              f"this and run the same command again to resume") from e
    return ConvertReport(dst, to, stats, sum(j.unit.nbytes for j in jobs), out_bytes, time.monotonic() - t0,
                         written, n_shards - written, dropped)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConversionError(f"--device {name!r} is not a torch device; use cpu (the default) or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConversionError(f"--device {name}: no CUDA device here; leave it out to convert on the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConversionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@contextlib.contextmanager
def _locked(dst: Path):
    """Hold `.<DST>.lock` (next to DST, outside the partial directory it protects) for the block."""
    path = dst.with_name(f".{dst.name}.lock")
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ConversionError(f"{dst} is being written by another `dsv3-run convert` (it holds {path}); wait "
                                  f"for it to finish, or stop it and run this command again to resume") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()   # its holder finished and removed it between our open and our lock: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)   # still held: whoever opened it meanwhile sees it gone and retries
        f.close()


def _old_copies(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{glob.escape(dst.name)}.old-*"), key=lambda p: p.stat().st_mtime_ns)


def _recover_overwrite(dst: Path, log) -> None:
    """Undo what a run killed while moving its result into place left: the old DST moved aside, or
    the progress record in the new DST."""
    olds = _old_copies(dst)
    if olds and not dst.exists():
        os.replace(olds[-1], dst)
        log(f"restored {dst} from {olds[-1].name}, where an interrupted --overwrite had moved it")
        olds = olds[:-1]
    for old in olds:      # DST is in place: these are what an --overwrite replaced
        shutil.rmtree(old)
        log(f"removed {old}, the replaced checkpoint an interrupted --overwrite left behind")
    (dst / STATE_FILE).unlink(missing_ok=True)


def _swap_in(part: Path, dst: Path) -> None:
    """Rename the finished partial directory to DST (the old DST is moved aside first, then deleted)."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}") if dst.exists() else None
    if old is not None:
        os.replace(dst, old)
    os.replace(part, dst)
    (dst / STATE_FILE).unlink()   # kept until now: a kill before this point resumes with every shard
    if old is not None:
        shutil.rmtree(old)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _resume_state(part: Path, fingerprint: str, n_shards: int, log) -> dict:
    """The finished shards of an earlier run of the same conversion that are intact on disk."""
    state = {"fingerprint": fingerprint, "shards": {}}
    if not part.exists():
        return state
    try:
        old = json.loads((part / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        log(f"{part} has no readable progress record ({STATE_FILE}); starting over")
    elif old.get("fingerprint") != fingerprint:
        log(f"{part} is from a different conversion or source; starting over")
    else:
        changed = []
        for name, rec in old.get("shards", {}).items():
            f = part / name
            if not f.is_file():
                continue
            if f.stat().st_size == rec.get("size") and rec.get("sha256") == _sha256(f):
                state["shards"][name] = rec
            else:
                changed.append(name)
        log(f"resuming {part}: {len(state['shards'])}/{n_shards} shards already written")
        for name in changed:
            log(f"{part / name} differs from what was written (size or SHA-256); converting it again")
        return state
    shutil.rmtree(part)
    return state


def _write_shards(ckpt: Checkpoint, jobs: list[_Job], names: list[str], part: Path, state: dict, to: str,
                  ue8m0: bool, dev: torch.device, progress: bool | None) -> tuple[dict[str, ClassStats], int]:
    """Convert and write every shard not already in `state`; returns per-class stats and shards written."""
    stats: dict[str, ClassStats] = {}
    for s in state["shards"].values():   # finished by an earlier, interrupted run
        for cls, (n, mx, e2, r2, b) in s["stats"].items():
            c = stats.setdefault(cls, ClassStats())
            c.tensors += n
            c.max_rel, c.err2, c.ref2, c.bound = max(c.max_rel, mx), c.err2 + e2, c.ref2 + r2, max(c.bound, tuple(b))
    shown = Progress(sum(j.unit.nbytes for j in jobs), "converting", enabled=progress, shards=len(names))
    written, writer, shard_stats, current = 0, None, {}, -1
    try:
        with torch.no_grad():
            for j in jobs:
                if names[j.shard] in state["shards"]:
                    shown.update(j.unit.nbytes)
                    continue
                if j.shard != current:
                    if writer is not None:
                        _finish_shard(writer, part, names[current], state, shard_stats)
                        written += 1
                    current, shard_stats = j.shard, {}
                    outs = [o for k in jobs if k.shard == j.shard for o in k.outputs]
                    writer = SafetensorsWriter(part / (names[current] + ".incomplete"), outs)
                    shown.shard(j.shard + 1)
                _convert_job(ckpt, j, _FORMAT[to], ue8m0, dev, writer, stats, shard_stats)
                ckpt.release(keep=ckpt.file_of[j.unit.key])   # companions from other shards: unmapped now
                shown.update(j.unit.nbytes)
            if writer is not None:
                _finish_shard(writer, part, names[current], state, shard_stats)
                written, writer = written + 1, None
    finally:
        if writer is not None:
            writer.f.close()
        shown.close()
        ckpt.release()
    return stats, written


def _finish_shard(writer: SafetensorsWriter, part: Path, name: str, state: dict, shard_stats: dict) -> None:
    writer.close()
    os.replace(writer.path, part / name)
    state["shards"][name] = {"size": (part / name).stat().st_size, "sha256": writer.sha256.hexdigest(),
                             "stats": {k: [s.tensors, s.max_rel, s.err2, s.ref2, list(s.bound)]
                                       for k, s in shard_stats.items()}}
    _write_json(part / STATE_FILE, state)


def _convert_job(ckpt: Checkpoint, j: _Job, fmt: str, ue8m0: bool, dev: torch.device, writer: SafetensorsWriter,
                 stats: dict, shard_stats: dict) -> None:
    u = j.unit
    if j.projection:
        src = read_weight(ckpt, u.source)
        data_o = j.outputs[0]
        data = torch.empty(data_o.shape, dtype=data_o.dtype, device=dev)
        if fmt == "dense":
            out = RawWeight(data, None, None, "dense")
            convert_into(src, "dense", torch.bfloat16, False, data, None)
        else:
            n_rows = data_o.shape[0]
            scale = torch.empty(scale_shape(fmt, *data_o.shape), dtype=torch.float32, device=dev)
            convert_into(src, fmt, torch.bfloat16, ue8m0, data, scale, requantize=j.quantized and src.format == fmt)
            out = RawWeight(data, scale, None, fmt)
        result = error_stats(src, out)
        writer.write(data_o.name, data)
        if fmt in ("fp8-block", "fp8-fnuz"):
            writer.write(j.outputs[1].name, scale)
        elif fmt == "int8-w8a8":
            writer.write(j.outputs[1].name, scale.view(n_rows, 1))
            writer.write(j.outputs[2].name, torch.zeros(n_rows, 1))
    else:
        t = ckpt.read(u.key).to(dev)
        y = t.to(j.outputs[0].dtype)
        as2d = (lambda x: x.reshape(x.shape[0] if x.dim() else 1, -1))    # norms and biases are 1-D
        result = error_stats(RawWeight(as2d(t), None, None, "dense"), RawWeight(as2d(y), None, None, "dense"))
        writer.write(j.outputs[0].name, y)
    bound = BOUNDS[j.kind]
    max_rel, err2, ref2 = result
    rms = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    if not (max_rel <= bound[0] and rms <= bound[1]):
        raise ConversionError(f"{ckpt.file_of[u.key]}: converting {u.key!r} to {j.outputs[0].dtype} gives max "
                              f"relative error {max_rel:.3e} and RMS relative error {rms:.3e}, beyond the "
                              f"{j.kind} bound {bound[0]:.3e} / {bound[1]:.3e}; the source holds non-finite "
                              f"values or the conversion is broken. Nothing was written to the output")
    cls = tensor_class(u.key)
    for table in (stats, shard_stats):
        table.setdefault(cls, ClassStats()).add(max_rel, err2, ref2, bound)
