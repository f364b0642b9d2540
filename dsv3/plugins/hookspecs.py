"""The dsv3 plugin API. Every hook a backend plugin may implement, with its contract.

A plugin is a module (or object) with functions decorated `@dsv3.plugins.hookimpl`, registered
from the entry-point group `dsv3` in its package metadata:

    [project.entry-points.dsv3]
    mychip = "mychip_dsv3.plugin"

Built-in backends (cpu, cuda, rocm, ascend) are ordinary plugins registered first; third-party
plugins are registered after them, so their answers come first and can override single ops
(pluggy's `tryfirst`/`trylast` on a hookimpl adjust that order). Hooks run when a model is built,
never per token: they produce a table of plain callables that the model then calls directly.

Loading follows pytest: entry points autoload unless DSV3_DISABLE_PLUGIN_AUTOLOAD is set; `-p NAME`
loads one anyway, `-p no:NAME` blocks one, `--plugin MODULE` (or DSV3_PLUGINS=mod1,mod2) registers a
module. `dsv3-run backends` shows what loaded; `dsv3-run check --backend NAME` verifies the ops.
A step-by-step guide: docs/writing-a-backend-plugin.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("dsv3")


@dataclass(frozen=True)
class BackendSpec:
    """What a backend declares about itself.

    name: canonical, lowercase, unique among installed plugins ("cuda"); profiles say `backend: NAME`.
    aliases: other names `--backend` accepts ("nvidia",). device_type: the torch device type its
    tensors live on ("cuda", "cpu", "npu"). probe: cheap, imports no SDK that may be missing;
    returns None when the hardware is here, else one line saying why not and what to install.
    default_profile: what `--backend NAME` runs with, a shipped profile name or a path to a YAML
    file the plugin ships. weight_formats: formats its `linear`/`moe_experts` run (see
    dsv3.core.weights); a profile asking for another is rejected before any weight is loaded.
    cache_dtypes: latent-cache dtypes it supports.
    """
    name: str
    aliases: tuple[str, ...]
    device_type: str
    probe: Callable[[], str | None]
    default_profile: str
    weight_formats: tuple[str, ...]
    description: str = ""
    cache_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    extra: dict = field(default_factory=dict)   # anything backend-specific its own hooks want to read


@hookspec
def dsv3_register_backends() -> list[BackendSpec]:
    """Declare the backends this plugin provides (empty if it only contributes ops).

    A name or alias another plugin already declared is an error: the latecomer plugin is not
    loaded. To replace ops of an existing backend, do not declare it; answer dsv3_backend_ops.
    """


@hookspec
def dsv3_backend_ops(backend: str) -> dict[str, Callable] | None:
    """Return {op name: callable} for the ops this plugin implements on `backend`, or None.

    Any plugin may answer for any backend: for each op the latest-registered plugin that offers
    it wins (a profile's `ops: {op: plugin}` pins one explicitly), and ops nobody offers fall back
    to the reference with one warning each. Op names and signatures are those of
    `dsv3.core.ops.OpSpecs`; `dsv3-run check` runs each against the reference. Import the
    hardware SDK (triton, torch_npu, ...) here, not at module import.
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
