"""The dsv3 plugin API. Every hook a backend plugin may implement, with its contract.

A plugin is a module (or object) with functions decorated `@dsv3.plugins.hookimpl`, registered
from the entry-point group `dsv3` in its package metadata:

    [project.entry-points.dsv3]
    mychip = "mychip_dsv3.plugin"

Built-in backends (cpu, cuda, rocm, ascend) are ordinary plugins registered first; third-party
plugins are registered after them, so their answers come first and can override single ops.
Hooks run when a model is built, never per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("dsv3")


@dataclass(frozen=True)
class BackendSpec:
    """What a backend declares about itself."""
    name: str                      # canonical name, used in profiles: "cuda"
    aliases: tuple[str, ...]       # other names accepted by --backend: ("nvidia",)
    device_type: str               # torch device type tensors live on: "cuda", "cpu", "npu"
    probe: Callable[[], str | None]  # cheap; None if the hardware is here, else why not (one line)
    default_profile: str           # profile used by `--backend NAME`
    weight_formats: tuple[str, ...]  # weight formats its linear can run (see dsv3.core.weights)
    description: str = ""
    cache_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    extra: dict = field(default_factory=dict)


@hookspec
def dsv3_register_backends() -> list[BackendSpec]:
    """Declare the backends this plugin provides (may be empty if it only contributes ops)."""


@hookspec
def dsv3_backend_ops(backend: str) -> dict[str, Callable] | None:
    """Return {op name: callable} for the ops this plugin implements on `backend`, or None.

    Called once per model build. Import the hardware SDK (triton, torch_npu, ...) here, not at
    module import. Op names and signatures are those of `dsv3.core.ops.OpSpecs`.
    """


@hookspec
def dsv3_prepare_weights(backend: str, model, profile) -> None:
    """Optionally transform loaded weights in place for `backend` (e.g. repack for a kernel).

    Called after loading, before the first step. The model's parameters are on the target device.
    """


@hookspec
def dsv3_validate_profile(profile) -> list[str] | None:
    """Return problems with `profile` that only this plugin knows about (one message each)."""


@hookspec(firstresult=True)
def dsv3_model_runner(backend: str, model, profile):
    """Optionally wrap the model's forward for `backend` (e.g. CUDA-graph replay of decode steps).

    Return a callable `runner(batch, caches) -> hidden` with the semantics of `model(batch, caches)`,
    or None to run the model eagerly. Called once per model build, after weight preparation.
    """


@hookspec(firstresult=True)
def dsv3_distributed_backend(backend: str) -> str | None:
    """The torch.distributed backend for `backend` ("nccl", "hccl", "gloo"), or None if not ours."""
