"""Plugin manager: registers built-in and third-party backends, resolves the op table once.

Conventions follow pytest's:
- third-party plugins load from the entry-point group `dsv3` unless DSV3_DISABLE_PLUGIN_AUTOLOAD
  is set (to anything non-empty);
- `-p NAME` loads the entry point NAME (or, failing that, imports the module NAME), even with
  autoloading off; `-p no:NAME` blocks the plugin NAME, built-ins included;
- `--plugin MODULE` and DSV3_PLUGINS=mod1,mod2 import modules and register them as plugins.
A plugin that fails to import, has a hookimpl pluggy rejects, implements an unknown hook, or
claims a backend name another plugin already has is reported (a warning naming the plugin and the
problem, kept in `Registry.failures`) and left out; the others keep working.

Plugins import on a worker thread with a deadline (DSV3_PLUGIN_IMPORT_TIMEOUT seconds, default 10):
one that hangs, or raises SystemExit / KeyboardInterrupt, is reported like any other failure instead
of stopping every command; Ctrl-C during an import names the plugin being imported.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pluggy

from dsv3.core.errors import PluginError
from dsv3.core.ops import ALL_OP_NAMES, OP_NAMES, Ops, handles_weight_format
from dsv3.plugins import hookspecs
from dsv3.plugins.hookspecs import BackendSpec

ENTRY_POINT_GROUP = "dsv3"
AUTOLOAD_ENV = "DSV3_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "DSV3_PLUGINS"
TIMEOUT_ENV = "DSV3_PLUGIN_IMPORT_TIMEOUT"
DEFAULT_IMPORT_TIMEOUT = 10.0   # seconds
BUILTIN_PLUGINS = (  # (name, module); the reference backend is what every op falls back to
    ("cpu", "dsv3.backends.reference.plugin"),
    ("cuda", "dsv3.backends.nvidia.plugin"),
    ("rocm", "dsv3.backends.amd.plugin"),
    ("ascend", "dsv3.backends.ascend.plugin"),
)
REFERENCE_BACKEND = "cpu"


def _warn(msg: str) -> None:
    print(f"dsv3: warning: {msg}", file=sys.stderr)


@dataclass
class Registry:
    """The plugin manager plus what it learned: backends by name and alias, plugin failures."""
    pm: pluggy.PluginManager
    warn: Callable[[str], None] = _warn
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    backend_plugin: dict[str, str] = field(default_factory=dict)   # backend name -> plugin name
    aliases: dict[str, str] = field(default_factory=dict)          # name or alias (lowercase) -> backend name
    failures: dict[str, str] = field(default_factory=dict)         # plugin name -> problem
    versions: dict[str, str] = field(default_factory=dict)         # plugin name -> "package version"
    _ops: dict[str, list] = field(default_factory=dict)            # backend -> op_impls(backend)

    def fail(self, plugin: str, problem: str, consequence: str) -> None:
        self.failures[plugin] = problem
        self.warn(f"plugin {plugin!r}: {problem}; {consequence}")

    def backend(self, name: str) -> BackendSpec:
        canonical = self.aliases.get(name.lower())
        if canonical is None:
            known = ", ".join(sorted(self.aliases))
            failed = "".join(f"\n  plugin {p!r} failed: {why}" for p, why in self.failures.items())
            raise PluginError(f"unknown backend {name!r}; known backends and aliases: {known}. A backend from a "
                              f"plugin package appears once the package is installed (see `dsv3-run backends`)"
                              f"{failed}")
        return self.backends[canonical]

    def op_impls(self, backend: str) -> list[tuple[str, dict[str, Callable]]]:
        """[(plugin name, {op: fn})] for `backend`, later-registered plugins first (they override).

        A plugin that fails here is left out with a warning, unless it owns `backend`: then the
        backend cannot run and that is a PluginError."""
        if backend in self._ops:
            return self._ops[backend]
        found = []
        for impl in reversed(self.pm.hook.dsv3_backend_ops.get_hookimpls()):
            name = self.pm.get_name(impl.plugin)
            try:
                ops = impl.function(backend=backend)
                if ops is not None:
                    ops = _validated_ops(ops)
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take the others down
                problem = f"dsv3_backend_ops(backend={backend!r}) failed: {type(e).__name__}: {e}"
                if self.backend_plugin.get(backend) == name:
                    raise PluginError(f"plugin {name!r}, which provides backend {backend!r}: {problem}") from e
                self.fail(name, problem, f"its ops for {backend!r} are not used")
                continue
            if ops:
                found.append((name, ops))
        self._ops[backend] = found
        return found


def _validated_ops(ops) -> dict[str, Callable]:
    if not isinstance(ops, dict):
        raise TypeError(f"returned {type(ops).__name__}, expected a dict of op name to callable")
    unknown = sorted(set(ops) - set(ALL_OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op name(s) {', '.join(map(repr, unknown))}; the ops are: {', '.join(ALL_OP_NAMES)}")
    not_callable = sorted(op for op, fn in ops.items() if not callable(fn))
    if not_callable:
        raise TypeError(f"op(s) {', '.join(not_callable)} are not callable")
    return dict(ops)


def _distribution_of(module_name: str) -> str | None:
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if not dists:
        return None
    try:
        return f"{dists[0]} {importlib.metadata.version(dists[0])}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _register(reg: Registry, plugin, name: str, version: str | None) -> bool:
    try:
        reg.pm.register(plugin, name=name)
    except Exception as e:  # noqa: BLE001 - pluggy's PluginValidationError, ValueError for a duplicate name
        reg.fail(name, f"cannot be registered: {e}", "it is not loaded")
        return False
    if version:
        reg.versions[name] = version
    return True


class _ImportFailed(Exception):
    """A plugin's import raised (anything, SystemExit included) or did not finish in time; the message
    completes "import of X ..."."""


def import_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_IMPORT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise PluginError(f"{TIMEOUT_ENV}={raw!r}: expected seconds to wait for a plugin's import, a number > 0")
    return seconds


def _guarded_import(load: Callable[[], object], what: str, warn: Callable[[str], None]):
    """load() on a daemon thread, waited for import_timeout() seconds: a plugin's import can raise
    SystemExit or KeyboardInterrupt, or hang, and none of that may stop dsv3. Ctrl-C while waiting
    says which plugin was importing, then interrupts as usual."""
    timeout = import_timeout()
    out: dict = {}

    def run():
        try:
            out["plugin"] = load()
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt from a plugin are its failure
            out["error"] = e
    worker = threading.Thread(target=run, name=f"dsv3 import {what}", daemon=True)
    try:
        worker.start()
        worker.join(timeout)
    except KeyboardInterrupt:
        warn(f"interrupted while importing {what}; if it hangs, uninstall it or set {AUTOLOAD_ENV}=1 "
             f"(plugins are then loaded only with -p NAME)")
        raise
    if worker.is_alive():
        raise _ImportFailed(f"did not finish within {timeout:g} s (it may wait on a network, a lock or a device; "
                            f"{TIMEOUT_ENV}=SECONDS waits longer)")
    if "error" in out:
        e = out["error"]
        kind = " (a plugin must not exit the program)" if isinstance(e, SystemExit) else ""
        raise _ImportFailed(f"failed: {type(e).__name__}{f': {e}' if str(e) else ''}{kind}") from e
    return out["plugin"]


def _load_entry_point(reg: Registry, ep: importlib.metadata.EntryPoint) -> None:
    if reg.pm.has_plugin(ep.name) or reg.pm.is_blocked(ep.name):
        return
    dist = getattr(ep, "dist", None)
    version = f"{dist.metadata['Name']} {dist.version}" if dist is not None else None
    try:
        plugin = _guarded_import(ep.load, f"plugin {ep.name!r} ({ep.value})", reg.warn)
    except _ImportFailed as e:
        package = f" {version.split()[0]}" if version else ""
        reg.fail(ep.name, f"import of {ep.value!r} {e}", f"it is skipped (fix or uninstall the package{package}, "
                 f"or set {AUTOLOAD_ENV}=1 to load plugins only when named with -p)")
        return
    _register(reg, plugin, ep.name, version)


def _load_module(reg: Registry, module: str, flag: str) -> None:
    if reg.pm.has_plugin(module) or reg.pm.is_blocked(module):
        return
    try:
        plugin = _guarded_import(lambda: importlib.import_module(module), f"plugin module {module!r}", reg.warn)
    except _ImportFailed as e:   # an explicitly requested plugin that cannot load is the user's error
        raise PluginError(f"{flag} {module}: import {e}") from e.__cause__
    _register(reg, plugin, module, _distribution_of(module))


def _drop_unknown_hooks(reg: Registry) -> None:
    """pytest's check_pending: a `dsv3_*` hookimpl without a hookspec is a typo or an API mismatch."""
    for hook_name in dir(reg.pm.hook):
        caller = getattr(reg.pm.hook, hook_name)
        if not hook_name.startswith("dsv3_") or not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            name = reg.pm.get_name(impl.plugin)
            known = ", ".join(n for n in dir(hookspecs) if n.startswith("dsv3_"))
            reg.fail(name, f"implements unknown hook {hook_name!r}; the hooks are: {known}", "it is not loaded")
            reg.pm.unregister(impl.plugin)


def create_registry(plugins: Iterable[str] = (), modules: Iterable[str] = (), autoload: bool | None = None,
                    entry_points=None, warn: Callable[[str], None] = _warn) -> Registry:
    """A plugin registry: built-ins, then entry points of group `dsv3` (unless autoload is off),
    then `plugins` (-p NAME or no:NAME), DSV3_PLUGINS and `modules` (--plugin). `entry_points`
    replaces discovery (tests pass fakes); `autoload` None means "unless DSV3_DISABLE_PLUGIN_AUTOLOAD"."""
    pm = pluggy.PluginManager("dsv3")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm, warn=warn)
    plugins = list(plugins)
    for p in plugins:
        if p.startswith("no:"):
            pm.set_blocked(p[3:])
    wanted = [p for p in plugins if not p.startswith("no:")]

    from dsv3 import __version__
    for name, module in BUILTIN_PLUGINS:
        if not pm.is_blocked(name):
            _register(reg, importlib.import_module(module), name, f"dsv3 {__version__}, built-in")

    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    eps = list(entry_points if entry_points is not None else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    by_name = {ep.name: ep for ep in eps}
    if autoload:
        for ep in eps:
            _load_entry_point(reg, ep)
    for name in wanted:
        if name in by_name:
            _load_entry_point(reg, by_name[name])
        elif importlib.util.find_spec(name.split(".")[0]) is not None:
            _load_module(reg, name, "-p")
        else:
            raise PluginError(f"-p {name}: no installed plugin has that entry-point name in group "
                              f"{ENTRY_POINT_GROUP!r} and no module of that name is importable; installed plugins: "
                              f"{', '.join(sorted(by_name)) or 'none'}")
    env_modules = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module in env_modules:
        _load_module(reg, module, f"{PLUGINS_ENV}=")
    for module in modules:
        _load_module(reg, module, "--plugin")
    _drop_unknown_hooks(reg)
    _collect_backends(reg)
    return reg


def _collect_backends(reg: Registry) -> None:
    # get_hookimpls() is in registration order (calls run it backwards), so built-ins claim names first.
    for impl in reg.pm.hook.dsv3_register_backends.get_hookimpls():
        plugin_name = reg.pm.get_name(impl.plugin)
        try:
            specs = list(impl.function() or [])
            bad = [s for s in specs if not isinstance(s, BackendSpec)]
            if bad:
                raise TypeError(f"returned {type(bad[0]).__name__}, expected dsv3.plugins.hookspecs.BackendSpec")
            for s in specs:
                if not (isinstance(s.name, str) and s.name and s.name == s.name.lower()):
                    raise ValueError(f"backend name {s.name!r} must be a non-empty lowercase string")
                if not callable(s.probe):
                    raise TypeError(f"backend {s.name!r}: probe must be callable")
        except Exception as e:  # noqa: BLE001
            reg.fail(plugin_name, f"dsv3_register_backends failed: {type(e).__name__}: {e}", "its backends are skipped")
            continue
        taken = {}
        for spec in specs:
            for n in (spec.name, *spec.aliases):
                if n.lower() in reg.aliases:
                    taken[n] = reg.backend_plugin[reg.aliases[n.lower()]]
        if taken:
            name, owner = next(iter(taken.items()))
            reg.fail(plugin_name, f"declares backend name {name!r}, which plugin {owner!r} already provides; pick "
                     f"another name, or contribute ops to {name!r} through dsv3_backend_ops without declaring it",
                     "it is not loaded")
            reg.pm.unregister(impl.plugin)
            continue
        for spec in specs:
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
    from dsv3.backends.reference.ops import OPS, SPARSE_OPS
    REFERENCE_OPS = {**OPS, **SPARSE_OPS}
    spec = reg.backend(backend)
    offers = reg.op_impls(spec.name)
    offered = dict(offers)
    offered.setdefault(REFERENCE_BACKEND, REFERENCE_OPS)  # pinning an op to "cpu" means the reference op
    plan = {}
    for op in ALL_OP_NAMES:
        if op in (pins or {}):
            source = offered.get(pins[op], {})
            if op not in source:
                raise PluginError(f"profile pins op {op!r} to plugin {pins[op]!r}, which provides no {op!r} "
                                  f"for backend {spec.name!r}; plugins offering it: "
                                  f"{', '.join(n for n, o in offers if op in o) or 'none'} (and 'cpu', the reference)")
            plan[op] = OpChoice(pins[op], source[op], fallback=False)
            continue
        chosen = next(((n, o[op]) for n, o in offers if op in o), None)
        plan[op] = (OpChoice(*chosen, fallback=False) if chosen
                    else OpChoice(REFERENCE_BACKEND, REFERENCE_OPS[op], fallback=True))
    return plan


def resolve_ops(reg: Registry, backend: str, pins: dict[str, str] | None = None,
                strict: bool = False, warn: Callable[[str], None] | None = None) -> Ops:
    """The op table for `backend` (see `plan_ops`): one warning line per op that falls back to the
    reference, or a PluginError listing them all if `strict`. Runs once per model build."""
    spec = reg.backend(backend)
    plan = plan_ops(reg, spec.name, pins)
    # the sparse-attention ops (dsv3.core.ops.SparseOpSpecs) fall back silently: only V3.2 models call them
    fallbacks = [op for op, c in plan.items() if c.fallback and op in OP_NAMES]
    if fallbacks and strict:
        raise PluginError(f"backend {spec.name!r} has no implementation of {', '.join(fallbacks)} and the profile "
                          f"is strict; drop `strict: true` to run the reference ops for them, or pin them "
                          f"(`ops: {{{fallbacks[0]}: cpu}}`)")
    for op in fallbacks:
        (warn or reg.warn)(f"backend {spec.name!r} has no {op!r}; using the reference implementation")
    return Ops.from_mapping({op: c.fn for op, c in plan.items()},
                            {op: f"{c.plugin} (reference fallback)" if c.fallback else c.plugin
                             for op, c in plan.items()})


def for_weight_format(ops: Ops, weight_format: str, warn: Callable[[str], None], strict: bool = False) -> Ops:
    """`ops` with every op that does not multiply `weight_format` weights (it says so with
    dsv3.core.ops.for_weight_formats) replaced by the reference's, one warning each. Runs once, when
    the model is built, so no op decides per call and a graph runner sees what will really run."""
    from dataclasses import replace

    from dsv3.backends.reference.ops import OPS as REFERENCE_OPS
    swaps, providers = {}, dict(ops.providers)
    for op in OP_NAMES:
        fn = getattr(ops, op)
        if not handles_weight_format(fn, weight_format):
            if strict:
                raise PluginError(f"{op} of {ops.providers.get(op, '?')} does not run {weight_format!r} weights and the "
                                  f"profile is strict; use weight_format {fn.weight_formats[0]!r} (dsv3-run convert), "
                                  f"or drop `strict: true` to run the reference {op} for them")
            warn(f"{op} of {ops.providers.get(op, '?')} does not run {weight_format!r} weights "
                 f"(it runs {', '.join(fn.weight_formats)}); using the reference implementation")
            swaps[op] = REFERENCE_OPS[op]
            providers[op] = f"{REFERENCE_BACKEND} (reference: {weight_format} weights)"
    return replace(ops, **swaps, providers=providers) if swaps else ops
