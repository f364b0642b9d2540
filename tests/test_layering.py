"""The package's layering, read from the source: the runtime never imports the applications built on it.

Layers, lowest first (a module may import its own layer and the ones below):
  core                      config, ops contract, weights, model, batch, cache, scheduler, runner, engine,
                            sampling, speculative, layout: hardware-agnostic, imports nothing else of dsv3
  parallel, backends,       the runtime's extensions: collectives over process groups, the ops of each
  plugins                   vendor, the plugin manager and hook specs
  applications              dsv3.llm (the Python API), dsv3.demo, checkpoints (convert, synthetic),
                            plugins.conformance, commands (the CLI), serve (HTTP)
Every import counts, function-level ones too (they are how the CLI stays fast, not a way round this).
"""
from __future__ import annotations

import ast
from pathlib import Path

import dsv3

ROOT = Path(dsv3.__file__).resolve().parent
APPLICATIONS = ("dsv3.llm", "dsv3.demo", "dsv3.__main__", "dsv3.checkpoints", "dsv3.plugins.conformance",
                "dsv3.commands", "dsv3.serve")
EXTENSIONS = ("dsv3.parallel", "dsv3.backends", "dsv3.plugins")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> int:
    if module == "dsv3" or _under(module, APPLICATIONS):     # the root package re-exports LLM
        return 2
    if _under(module, EXTENSIONS):
        return 1
    assert _under(module, ("dsv3.core",)), f"{module} is in no layer: add it to one in this test"
    return 0


def imports() -> dict[str, set[str]]:
    """module -> the dsv3 modules it imports (a `from pkg import name` of a submodule names the submodule)."""
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("dsv3")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.startswith("dsv3"):
                    for a in node.names:
                        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        # the root package loads nothing when imported (__version__, and LLM only on first access), so
        # `from dsv3 import __version__` does not reach up; test_root_package_loads_nothing keeps it so
        graph[module] = {m for m in found if m in modules and m not in (module, "dsv3")}
    return graph


def test_root_package_loads_nothing():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_every_module_is_placed():
    for module in imports():
        layer(module)     # raises for a module outside every layer


def test_no_module_imports_a_higher_layer():
    wrong = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
             for m, deps in imports().items() for d in sorted(deps) if layer(d) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_the_model_needs_only_the_frozen_layout():
    deps = imports()["dsv3.core.model"]
    assert "dsv3.core.layout" in deps and not any(_under(d, ("dsv3.parallel",)) for d in deps)
    from dsv3.core.layout import SINGLE
    import dataclasses
    assert dataclasses.fields(SINGLE) and type(SINGLE).__dataclass_params__.frozen


def test_no_import_cycles():
    graph = imports()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d.startswith(m + "."):      # a package importing its own submodule is not a cycle
                continue
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
