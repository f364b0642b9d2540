"""`dsv3-run profiles [NAME|PATH]`: list the profiles, or show one with every field resolved."""
from __future__ import annotations


def register(subparsers) -> None:
    from dsv3.commands.options import add_plugin_args

    p = subparsers.add_parser(
        "profiles", help="list the shipped YAML profiles, or show one in full",
        description="Without an argument: the profiles shipped in dsv3/configs and the default profiles of plugin "
                    "backends. With NAME or PATH: that profile with every field (defaults filled in), validated "
                    "against its backend.")
    p.add_argument("profile", nargs="?", metavar="NAME|PATH", help="a profile to show in full")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from dsv3.core.profile import CONFIG_DIR, load_profile, profile_names, validate_for_backend
    from dsv3.plugins.manager import create_registry

    registry = create_registry(plugins=args.plugins, modules=args.plugin_modules)
    if args.profile:
        profile = load_profile(args.profile)
        validate_for_backend(profile, registry.backend(profile.backend))
        print(f"# {profile.source}")
        print(yaml.safe_dump(profile.to_dict(), sort_keys=False).rstrip())
        return 0

    entries = [(name, name, load_profile(name)) for name in profile_names()]
    shipped = {str(CONFIG_DIR / f"{n}.yaml") for n in profile_names()}
    plugin_files = []
    for backend, spec in registry.backends.items():   # plugins may ship their default profile as a file
        if spec.default_profile not in profile_names():
            profile = load_profile(spec.default_profile)
            if profile.source not in shipped:
                label = f"{Path(profile.source).stem} (plugin {registry.backend_plugin[backend]})"
                entries.append((spec.default_profile, label, profile))
                plugin_files.append(f"  {label}: {profile.source}")
    defaults = {spec.default_profile: name for name, spec in registry.backends.items()}
    rows = [("profile", "backend", "dtype", "weights", "kv cache", "default for", "description")]
    for key, label, p in entries:
        rows.append((label, p.backend, p.dtype, p.weight_format, f"{p.kv_cache.dtype}/{p.kv_cache.block_size}",
                     f"--backend {defaults[key]}" if key in defaults else "", p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    if plugin_files:
        print("\nprofiles shipped by plugins (use them with --profile PATH):\n" + "\n".join(plugin_files))
    print("\nuse one with --profile NAME (or a path to your own YAML); `dsv3-run profiles NAME` shows every field")
    return 0
