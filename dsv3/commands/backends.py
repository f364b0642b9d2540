"""`dsv3-run backends`: every backend, where it came from, whether its hardware is here, op coverage."""
from __future__ import annotations


def register(subparsers) -> None:
    from dsv3.commands.options import add_plugin_args

    p = subparsers.add_parser(
        "backends", help="list backends, their plugins, hardware here, default profiles and op coverage",
        description="Every backend the installed plugins declare: the plugin and package it came from, its aliases, "
                    "whether its hardware is present on this machine (and if not, why), its default profile, and "
                    "for each op whether the backend implements it natively or falls back to the reference.")
    add_plugin_args(p)
    p.set_defaults(func=run)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _profile_label(profile: str) -> str:
    from pathlib import Path
    path = Path(profile)
    return f"{path.stem} (plugin's file)" if path.suffix in (".yaml", ".yml") else profile


def _probe(spec) -> str | None:
    try:
        return spec.probe()
    except Exception as e:  # noqa: BLE001 - a probe that crashes means "not here", with the reason
        return f"probe raised {type(e).__name__}: {e}"


def run(args) -> int:
    from dsv3.core.errors import Dsv3Error
    from dsv3.core.ops import ALL_OP_NAMES
    from dsv3.plugins.manager import create_registry, plan_ops

    registry = create_registry(plugins=args.plugins, modules=args.plugin_modules)
    names = list(registry.backends)
    rows = [["backend", "aliases", "device", "hardware here", "default profile", "plugin (package)"]]
    absent, coverage, unknown_ops = [], {}, []
    for name in names:
        spec = registry.backends[name]
        plugin = registry.backend_plugin[name]
        missing = _probe(spec)
        here = "no" if missing else ("emulated" if spec.extra.get("emulated") else "yes")
        rows.append([name, ", ".join(spec.aliases) or "-", spec.device_type, here,
                     _profile_label(spec.default_profile),
                     f"{plugin} ({registry.versions.get(plugin, 'package unknown')})"])
        if missing:
            absent.append(f"  {name}: {missing}.\n    where it is present: dsv3-run --backend {name} "
                          f"(profile {spec.default_profile}), and `dsv3-run check --backend {name}` to verify it")
        try:
            plan = plan_ops(registry, name)
        except Dsv3Error as e:
            unknown_ops.append(f"  {name}: {e}")
            continue
        coverage[name] = {op: "fallback" if c.fallback else "native" if c.plugin == plugin else c.plugin
                          for op, c in plan.items()}
    print(_table(rows))
    if absent:
        print("\nnot available on this machine:")
        print("\n".join(absent))

    op_rows = [["op", *names]] + [[op, *(coverage[n][op] if n in coverage else "?" for n in names)] for op in ALL_OP_NAMES]
    print("\nops (native: the backend's own plugin; fallback: the reference implementation runs it; "
          "another name: that plugin overrides it):")
    print(_table(op_rows))
    if unknown_ops:
        print("\nop coverage could not be read on this machine (building the backend's op table failed; "
              "usually its SDK or device is missing):")
        print("\n".join(unknown_ops))
    if registry.failures:
        print("\nplugins that failed to load:")
        for plugin, problem in registry.failures.items():
            print(f"  {plugin}: {problem}")
    return 0
