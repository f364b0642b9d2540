"""`dsv3-run check --backend X [--profile P]`: the conformance suite (dsv3.plugins.conformance)."""
from __future__ import annotations

import sys

from dsv3.core.errors import Dsv3Error


def register(subparsers) -> None:
    from dsv3.commands.options import add_plugin_args

    p = subparsers.add_parser(
        "check", help="run a backend's ops against the reference, then a tiny-model generation",
        description="Every op the backend provides runs against the pure-PyTorch reference on fresh random "
                    "inputs, at small shapes and at DeepSeek-V3's per-layer shapes; then a tiny random model "
                    "generates greedily through the backend and through the reference. Exits 1 on any failure.")
    g = p.add_argument_group("what to check")
    g.add_argument("--backend", metavar="NAME", help="backend or alias (default: the profile's, else cpu)")
    g.add_argument("--profile", metavar="NAME|PATH", help="profile to check with (default: the backend's default profile)")
    g.add_argument("--device", help="torch device for the tensors (default: the profile's, else the backend's "
                   "device type); e.g. cpu for a backend that emulates its hardware")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="activation dtype (overrides the profile)")
    g.add_argument("--weight-format", choices=("auto", "dense", "fp8-block", "fp8-fnuz", "int8-w8a8"),
                   help="weight format for linear and moe_experts at real shapes (overrides the profile)")
    g.add_argument("--kv-cache-dtype", help="latent cache dtype (overrides the profile)")
    g.add_argument("--ops", metavar="OP,OP", help="check only these ops")
    g.add_argument("--seed", type=int, help="replay a run's random inputs (each run prints its seed)")
    g.add_argument("--quick", action="store_true", help="small shapes only (skip DeepSeek-V3's real shapes)")
    g.add_argument("--no-generate", dest="generate", action="store_false", help="skip the tiny-model generation")
    add_plugin_args(g)
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3.plugins.conformance import check_backend, format_row, table_header
    from dsv3.core.ops import ALL_OP_NAMES as OP_NAMES
    from dsv3.core.profile import select_profile
    from dsv3.plugins.manager import create_registry

    registry = create_registry(plugins=args.plugins, modules=args.plugin_modules)
    profile = select_profile(registry, args.backend, args.profile, {
        "dtype": args.dtype, "weight_format": args.weight_format, "kv_cache.dtype": args.kv_cache_dtype})
    only = [op.strip() for op in args.ops.split(",")] if args.ops else None
    unknown = sorted(set(only or ()) - set(OP_NAMES))
    if unknown:
        raise Dsv3Error(f"--ops: unknown op(s) {', '.join(unknown)}; known ops: {', '.join(OP_NAMES)}")
    spec = registry.backend(profile.backend)
    device = args.device or profile.device
    missing = spec.probe()
    if missing and (device is None or device.split(":")[0] == spec.device_type):
        raise Dsv3Error(f"backend {spec.name!r} cannot run here: {missing}. Run the check on that hardware, or "
                        f"pass --device cpu if the backend runs (or emulates its hardware) on the CPU")

    def show(result):
        print(format_row(result), flush=True)

    print(f"backend {spec.name!r} (plugin {registry.backend_plugin[spec.name]}), profile {profile.source}")
    header_printed = []

    def on_result(result):
        if not header_printed:
            print(table_header())
            header_printed.append(True)
        show(result)

    report = check_backend(registry, profile, device=device, seed=args.seed, real_shapes=not args.quick,
                           generation=args.generate, only=only, on_result=on_result, debug=args.debug)
    s = report.setting
    print(f"\ndevice {s.device}, dtype {str(s.dtype).removeprefix('torch.')}, weight formats "
          f"{', '.join(s.weight_formats)}, seed {report.seed} (replay with --seed {report.seed})")
    print("max rel err = max|backend - reference| / max|reference|, reference in float32 on the same inputs")
    if report.fallbacks:
        print(f"not checked (the backend has no implementation; the reference runs them): {', '.join(report.fallbacks)}")
    if len(set(report.checked.values())) > 1:
        print("ops by plugin: " + ", ".join(f"{op}={p}" for op, p in report.checked.items()))
    if report.generation is not None:
        g = report.generation
        print(f"generation: {g.identical}/{g.tokens} greedy tokens identical to the reference; {g.detail} -> "
              f"{'pass' if g.passed else 'FAIL'}")
    failed_ops = sorted({r.op for r in report.failed})
    if report.passed:
        print(f"PASS: {len(report.results)} cases, {len(report.checked)} ops")
        return 0
    what = [f"op(s) {', '.join(failed_ops)}"] if failed_ops else []
    if report.generation is not None and not report.generation.passed:
        what.append("generation")
    print(f"FAIL: {', '.join(what)} ({len(report.failed)} of {len(report.results)} cases failed)", file=sys.stderr)
    return 1
