"""Profiles: how to run (backend, precision, cache, parallelism, speculation, op pins), from YAML.

The checkpoint's config.json says what the model is; a profile says how to run it. Shipped
profiles live in dsv3/configs/NAME.yaml. Unknown keys, wrong types and impossible combinations are
ProfileErrors naming the file, the key, the bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path


from dsv3.core.errors import ProfileError, brief, read_document
from dsv3.core.ops import ALL_OP_NAMES
from dsv3.core.weights import WEIGHT_FORMATS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")
CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float8_e4m3fn")


@dataclass(frozen=True)
class KVCache:
    dtype: str = "auto"          # auto = the activation dtype
    block_size: int = 64         # tokens per block (FlashMLA's size)
    max_tokens: int = 32768      # cache capacity in tokens, all sequences together


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    ep: int = 1
    dp: int = 1      # data-parallel attention groups (dp x tp = the world size); see dsv3.core.layout


@dataclass(frozen=True)
class Speculative:
    method: str = "none"         # none | mtp
    num_draft_tokens: int = 1
    policy: str = "adaptive"     # adaptive: draft while it pays (speculative.DraftPolicy); always: every step


@dataclass(frozen=True)
class Profile:
    backend: str = "cpu"
    device: str | None = None    # default: the backend's device type (e.g. "cuda")
    dtype: str = "float32"       # activation dtype
    weight_format: str = "auto"  # auto = the checkpoint's; else converted at load
    ue8m0: bool | None = None    # power-of-two activation scales; None = as the checkpoint says
    kv_cache: KVCache = field(default_factory=KVCache)
    max_batch_tokens: int = 2048  # tokens per step (chunked prefill budget)
    parallel: Parallel = field(default_factory=Parallel)
    speculative: Speculative = field(default_factory=Speculative)
    cuda_graphs: bool = False
    ops: dict = field(default_factory=dict)  # op name -> plugin name
    strict: bool = False         # a missing backend op is an error, not a reference fallback
    description: str = ""
    source: str = "<defaults>"   # where it came from, for error messages

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


_CHOICES = {"dtype": DTYPES, "weight_format": ("auto",) + WEIGHT_FORMATS, "kv_cache.dtype": CACHE_DTYPES,
            "speculative.method": ("none", "mtp"), "speculative.policy": ("adaptive", "always")}
_MIN = {"kv_cache.block_size": 1, "kv_cache.max_tokens": 1, "max_batch_tokens": 1, "parallel.tp": 1,
        "parallel.ep": 1, "parallel.dp": 1, "speculative.num_draft_tokens": 1}
# Upper bounds: far above what runs, low enough that a typo fails here instead of in an allocation.
_MAX = {"kv_cache.block_size": 2**12, "kv_cache.max_tokens": 2**31 - 1,   # cache slots are int32
        "max_batch_tokens": 2**20, "parallel.tp": 1024, "parallel.ep": 1024, "parallel.dp": 1024,
        "speculative.num_draft_tokens": 16}       # one MTP module drafts recursively; acceptance falls per draft
_HINT = {"kv_cache.max_tokens": "; set it with --max-cache-tokens (`dsv3-run plan` says how many tokens fit)",
         "speculative.num_draft_tokens": " (--num-draft-tokens); DeepSeek-V3 drafts 1 or 2 well"}
MAX_PROFILE_BYTES = 2**16   # a profile is a few lines of YAML


def _build(cls, data, source: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: {prefix.rstrip('.') or 'profile'} must be a mapping, got {brief(data)}")
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    values = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ProfileError(f"{source}: unknown key {brief(path)}{hint}; allowed keys"
                               f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}")
        default = known[key].default_factory() if callable(known[key].default_factory) else known[key].default
        if is_dataclass(default):
            values[key] = _build(type(default), value, source, f"{path}.")
            continue
        values[key] = _check_value(path, value, default, source)
    built = cls(**values)
    if cls is Profile:
        _check_combination(built, source)
    return built


def _check_combination(p: "Profile", source: str) -> None:
    """Values that are fine alone but impossible together."""
    kv, spec = p.kv_cache, p.speculative
    drafts = spec.num_draft_tokens if spec.method == "mtp" else 0
    capacity = -(-kv.max_tokens // kv.block_size) * kv.block_size
    if capacity < drafts + 3:   # one prompt token, the next, and the slots drafting reserves
        raise ProfileError(f"{source}: kv_cache.max_tokens = {kv.max_tokens} holds {capacity} tokens, too few for "
                           f"a prompt plus {drafts} draft token(s); raise kv_cache.max_tokens (--max-cache-tokens)")
    if drafts + 1 > p.max_batch_tokens:
        raise ProfileError(f"{source}: speculative.num_draft_tokens = {drafts} needs max_batch_tokens >= "
                           f"{drafts + 1} (a verify step runs the last token and its drafts); it is "
                           f"{p.max_batch_tokens}")


def _key(key) -> str:
    """A mapping key as written in a message: short strings as they are, anything else bounded."""
    return key if isinstance(key, str) and len(key) <= 80 else brief(key)


def _check_value(path: str, value, default, source: str):
    def bad(allowed):
        return ProfileError(f"{source}: {path} = {brief(value)} is invalid; {allowed}")

    if path == "ops":
        if not isinstance(value, dict):
            raise bad("expected a mapping of op name to plugin name")
        for op, plugin in value.items():
            if op not in ALL_OP_NAMES:
                raise ProfileError(f"{source}: ops.{_key(op)}: unknown op; known ops: {', '.join(ALL_OP_NAMES)}")
            if not isinstance(plugin, str):
                raise ProfileError(f"{source}: ops.{op} = {brief(plugin)}: expected a plugin name")
        return dict(value)
    if isinstance(default, bool) or (path == "ue8m0"):
        if value is None and path == "ue8m0":
            return None
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("expected an integer")
        if value < _MIN.get(path, 0):
            raise bad(f"must be >= {_MIN.get(path, 0)}{_HINT.get(path, '')}")
        if path in _MAX and value > _MAX[path]:
            raise bad(f"must be <= {_MAX[path]}{_HINT.get(path, '')}")
        return value
    if path == "device" and value is None:
        return None
    if not isinstance(value, str):
        raise bad("expected a string")
    if path == "device" and not re.fullmatch(r"[a-z_]+(:\d+)?", value):
        raise bad("expected a torch device such as cpu, cuda, cuda:1, npu:0")
    if path == "device" and value.split(":")[0] == "meta":
        raise bad("the meta device holds no data, so a model cannot run on it; use cpu, cuda, cuda:1, npu:0")
    if path in _CHOICES and value not in _CHOICES[path]:
        raise bad(f"allowed: {', '.join(_CHOICES[path])}")
    return value


def profile_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (`cuda-fp8`) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown profile {name_or_path!r}; shipped profiles: {', '.join(profile_names())} "
                               f"(or pass a path to a YAML file)")
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file" if not path.exists() else
                           f"{path}: not a regular file; a profile is a YAML file")
    data = read_document(path, ProfileError, "a profile", language="YAML", max_bytes=MAX_PROFILE_BYTES,
                         mapping=False)        # _build says "profile must be a mapping" in its own words
    return replace(_build(Profile, data, str(path)), source=str(path))


def with_overrides(profile: Profile, overrides: dict) -> Profile:
    """Apply dotted-key overrides (CLI flags: {"kv_cache.dtype": "bfloat16"}) and re-validate."""
    data = profile.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        node, *rest = key.split(".")
        if rest:
            data.setdefault(node, {})[rest[0]] = value
        else:
            data[key] = value
    return replace(_build(Profile, data, f"{profile.source} + overrides (flags or LLM keyword arguments)"), source=profile.source)


def select_profile(registry, backend: str | None = None, profile: str | None = None,
                   overrides: dict | None = None) -> Profile:
    """The profile a command runs with: `profile` (a name or path) if given, else `backend`'s default
    profile, else `cpu`; then `overrides` (CLI flags, dotted keys, None = not given) on top."""
    if profile is not None:
        chosen = load_profile(profile)
        if backend is not None and registry.backend(backend).name != registry.aliases.get(chosen.backend.lower()):
            raise ProfileError(f"backend {backend!r} (--backend, or LLM's backend=) contradicts profile {chosen.source} "
                               f"(backend {chosen.backend!r}); "
                               f"give one or the other, or override the profile's backend with a profile of your own")
    else:
        chosen = load_profile(registry.backend(backend or "cpu").default_profile)
    if chosen.backend.lower() not in registry.aliases:
        raise ProfileError(f"{chosen.source}: backend = {chosen.backend!r} is not a known backend; known: "
                           f"{', '.join(sorted(registry.aliases))} (a plugin's backend needs its package installed)")
    return with_overrides(chosen, overrides or {})


def validate_for_backend(profile: Profile, spec) -> None:
    """Checks that need the backend's declaration; run before any weight is loaded."""
    if profile.weight_format != "auto" and profile.weight_format not in spec.weight_formats:
        raise ProfileError(f"{profile.source}: weight_format = {profile.weight_format!r} cannot run on backend "
                           f"{spec.name!r}; it runs: {', '.join(spec.weight_formats)}")
    cache = profile.kv_cache.dtype
    if cache != "auto" and cache not in spec.cache_dtypes:
        raise ProfileError(f"{profile.source}: kv_cache.dtype = {cache!r} is not supported by backend "
                           f"{spec.name!r}; it supports: {', '.join(spec.cache_dtypes)}")
    if profile.cuda_graphs and spec.device_type != "cuda":
        raise ProfileError(f"{profile.source}: cuda_graphs = true needs a CUDA device; backend {spec.name!r} "
                           f"runs on {spec.device_type!r}")
