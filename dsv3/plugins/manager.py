"""Plugin manager: registers built-in and third-party backends, resolves the op table once.

Conventions follow pytest's: third-party plugins load from the entry-point group `dsv3` unless
DSV3_DISABLE_PLUGIN_AUTOLOAD is set; `-p NAME` loads one entry point by name and `--plugin MODULE`
imports a module as a plugin, either way even when autoloading is off. A plugin that fails to
import or register is reported once and skipped; the others keep working.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import pluggy

from dsv3.core.errors import PluginError
from dsv3.core.ops import OP_NAMES, Ops
from dsv3.plugins import hookspecs
from dsv3.plugins.hookspecs import BackendSpec

ENTRY_POINT_GROUP = "dsv3"
AUTOLOAD_ENV = "DSV3_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PLUGINS = (  # (name, module); the reference backend is what every op falls back to
    ("cpu", "dsv3.backends.reference.plugin"),
    ("cuda", "dsv3.backends.nvidia.plugin"),
    ("rocm", "dsv3.backends.amd.plugin"),
    ("ascend", "dsv3.backends.ascend.plugin"),
)
REFERENCE_BACKEND = "cpu"


@dataclass
class Registry:
    """The plugin manager plus what it learned: backends by name and alias, plugin failures."""
    pm: pluggy.PluginManager
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    backend_plugin: dict[str, str] = field(default_factory=dict)   # backend name -> plugin name
    aliases: dict[str, str] = field(default_factory=dict)          # alias -> backend name
    failures: dict[str, str] = field(default_factory=dict)         # plugin name -> problem
    versions: dict[str, str] = field(default_factory=dict)         # plugin name -> "dist version"

    def backend(self, name: str) -> BackendSpec:
        canonical = self.aliases.get(name.lower())
        if canonical is None:
            known = ", ".join(sorted(self.aliases))
            failed = "".join(f"\n  plugin {p!r} failed to load: {why}" for p, why in self.failures.items())
            raise PluginError(f"unknown backend {name!r}; known backends and aliases: {known}"
                              f" (see `dsv3-run backends`){failed}")
        return self.backends[canonical]

    def op_impls(self, backend: str) -> list[tuple[str, dict[str, Callable]]]:
        """[(plugin name, {op: fn})] for `backend`, later-registered plugins first (they override)."""
        found = []
        for impl in reversed(self.pm.hook.dsv3_backend_ops.get_hookimpls()):
            name = self.pm.get_name(impl.plugin)
            try:
                ops = impl.function(backend=backend)
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take the others down
                raise PluginError(f"plugin {name!r} failed to provide ops for backend {backend!r}: "
                                  f"{type(e).__name__}: {e}") from e
            if ops:
                unknown = sorted(set(ops) - set(OP_NAMES))
                if unknown:
                    raise PluginError(f"plugin {name!r} provides unknown ops {unknown} for {backend!r}; "
                                      f"known ops: {', '.join(OP_NAMES)}")
                found.append((name, dict(ops)))
        return found


def _warn(msg: str) -> None:
    print(f"dsv3: warning: {msg}", file=sys.stderr)


def _register(reg: Registry, plugin, name: str) -> None:
    try:
        reg.pm.register(plugin, name=name)
    except Exception as e:  # noqa: BLE001 - pluggy's PluginValidationError and ValueError for dup names
        reg.failures[name] = f"{type(e).__name__}: {e}"
        _warn(f"plugin {name!r} was not registered: {e}")


def _load_entry_point(reg: Registry, ep: importlib.metadata.EntryPoint) -> None:
    if reg.pm.has_plugin(ep.name) or reg.pm.is_blocked(ep.name):
        return
    try:
        plugin = ep.load()
    except Exception as e:  # noqa: BLE001
        reg.failures[ep.name] = f"import of {ep.value!r} failed: {type(e).__name__}: {e}"
        _warn(f"plugin {ep.name!r} ({ep.value}) failed to import: {type(e).__name__}: {e}; skipped")
        return
    _register(reg, plugin, ep.name)
    if ep.dist is not None:
        reg.versions[ep.name] = f"{ep.dist.metadata['Name']} {ep.dist.version}"


def create_registry(plugins: list[str] = (), modules: list[str] = (), autoload: bool | None = None,
                    entry_points=None) -> Registry:
    """Build a plugin registry. `plugins`: entry-point names to load (-p); `modules`: importable
    modules to register (--plugin); `entry_points`: override discovery (tests pass fakes)."""
    pm = pluggy.PluginManager("dsv3")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)
    from dsv3 import __version__
    for name, module in BUILTIN_PLUGINS:
        _register(reg, importlib.import_module(module), name)
        reg.versions[name] = f"dsv3 {__version__} (built-in)"
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    eps = list(entry_points if entry_points is not None
               else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    wanted = set(plugins)
    unknown = wanted - {ep.name for ep in eps}
    if unknown:
        raise PluginError(f"-p {sorted(unknown)[0]}: no installed plugin has that entry-point name in group "
                          f"{ENTRY_POINT_GROUP!r}; installed: {sorted(ep.name for ep in eps) or 'none'}")
    for ep in eps:
        if autoload or ep.name in wanted:
            _load_entry_point(reg, ep)
    for module in modules:
        try:
            plugin = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"--plugin {module}: import failed: {type(e).__name__}: {e}") from e
        _register(reg, plugin, module)
    _collect_backends(reg)
    return reg


def _collect_backends(reg: Registry) -> None:
    # Call each plugin in registration order so a built-in keeps its name against a latecomer.
    for impl in reversed(reg.pm.hook.dsv3_register_backends.get_hookimpls()):
        plugin_name = reg.pm.get_name(impl.plugin)
        try:
            specs = impl.function() or []
        except Exception as e:  # noqa: BLE001
            reg.failures[plugin_name] = f"dsv3_register_backends raised {type(e).__name__}: {e}"
            _warn(f"plugin {plugin_name!r}: dsv3_register_backends raised {e}; its backends are skipped")
            continue
        for spec in specs:
            clash = [n for n in (spec.name, *spec.aliases) if n.lower() in reg.aliases]
            if clash:
                owner = reg.backend_plugin[reg.aliases[clash[0].lower()]]
                msg = (f"declares backend name {clash[0]!r}, which plugin {owner!r} already provides; "
                       f"pick another name, or contribute ops to {clash[0]!r} via dsv3_backend_ops")
                reg.failures[plugin_name] = msg
                _warn(f"plugin {plugin_name!r} {msg}; its backend is ignored")
                continue
            reg.backends[spec.name] = spec
            reg.backend_plugin[spec.name] = plugin_name
            for n in (spec.name, *spec.aliases):
                reg.aliases[n.lower()] = spec.name


@dataclass(frozen=True)
class OpChoice:
    """Where one op of a backend's table comes from."""
    plugin: str          # the plugin whose implementation is used
    fn: Callable
    fallback: bool       # True: the backend has none, the reference implementation stands in


def plan_ops(reg: Registry, backend: str, pins: dict[str, str] | None = None) -> dict[str, OpChoice]:
    """Per op: the pinned plugin's implementation, else the latest-registered plugin's that provides
    it for `backend`, else the reference one (marked as a fallback)."""
    from dsv3.backends.reference.ops import OPS as REFERENCE_OPS
    spec = reg.backend(backend)
    offers = reg.op_impls(spec.name)
    offered = dict(offers)
    offered.setdefault(REFERENCE_BACKEND, REFERENCE_OPS)  # pinning an op to "cpu" means the reference op
    plan = {}
    for op in OP_NAMES:
        if op in (pins or {}):
            source = offered.get(pins[op], {})
            if op not in source:
                raise PluginError(f"profile pins op {op!r} to plugin {pins[op]!r}, which provides no {op!r} "
                                  f"for backend {spec.name!r}; plugins offering it: "
                                  f"{[n for n, o in offers if op in o] or 'none'}")
            plan[op] = OpChoice(pins[op], source[op], fallback=False)
            continue
        chosen = next(((n, o[op]) for n, o in offers if op in o), None)
        plan[op] = (OpChoice(*chosen, fallback=False) if chosen
                    else OpChoice(REFERENCE_BACKEND, REFERENCE_OPS[op], fallback=True))
    return plan


def resolve_ops(reg: Registry, backend: str, pins: dict[str, str] | None = None,
                strict: bool = False, warn: Callable[[str], None] = _warn) -> Ops:
    """The op table for `backend` (see `plan_ops`): one warning line per op that falls back to the
    reference, or a PluginError listing them all if `strict`. Runs once per model build."""
    spec = reg.backend(backend)
    plan = plan_ops(reg, spec.name, pins)
    fallbacks = [op for op, c in plan.items() if c.fallback]
    if fallbacks and strict:
        raise PluginError(f"backend {spec.name!r} has no implementation of {', '.join(fallbacks)} and the profile "
                          f"is strict; drop `strict: true` to run the reference ops for them, or pin them "
                          f"(`ops: {{{fallbacks[0]}: cpu}}`)")
    for op in fallbacks:
        warn(f"backend {spec.name!r} has no {op!r}; using the reference implementation")
    return Ops.from_mapping({op: c.fn for op, c in plan.items()},
                           {op: f"{c.plugin} (reference fallback)" if c.fallback else c.plugin
                            for op, c in plan.items()})
