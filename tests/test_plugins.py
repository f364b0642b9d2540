"""The plugin system with a fresh plugin manager and fake entry points (pluggy's own testing style)."""
from __future__ import annotations

import types

import pytest
import torch

from dsv3.backends.reference import ops as reference
from dsv3.commands.main import main
from dsv3.core.errors import PluginError
from dsv3.core.ops import OP_NAMES
from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec
from dsv3.plugins.manager import AUTOLOAD_ENV, create_registry, plan_ops, resolve_ops


class FakeEntryPoint:
    """What importlib.metadata.entry_points(group="dsv3") yields, minus the installed package."""

    def __init__(self, name: str, plugin=None, error: Exception | None = None):
        self.name, self.value, self.group, self.dist = name, f"fake_{name}.plugin", "dsv3", None
        self._plugin, self._error = plugin, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._plugin


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def fake_backend(name="fake", aliases=(), **kw) -> BackendSpec:
    return BackendSpec(name=name, aliases=aliases, device_type="cpu", probe=lambda: None, default_profile="cpu",
                       weight_formats=("dense",), **kw)


def counted_rms_norm(calls: list):
    def rms_norm(x, weight, eps):
        calls.append(1)
        return reference.rms_norm(x, weight, eps)
    return rms_norm


def registry(*entry_points, warnings: list | None = None, **kw):
    return create_registry(entry_points=list(entry_points), warn=(warnings if warnings is not None else []).append, **kw)


def test_builtin_backends_answer_to_their_aliases():
    reg = registry()
    for alias, name in [("cpu", "cpu"), ("reference", "cpu"), ("nvidia", "cuda"), ("CUDA", "cuda"), ("amd", "rocm"),
                        ("npu", "ascend")]:
        assert reg.backend(alias).name == name
    with pytest.raises(PluginError, match="unknown backend 'tpu'; known backends and aliases: .*nvidia"):
        reg.backend("tpu")
    assert not reg.failures


def test_entry_point_adds_a_backend_and_overrides_one_op_of_cpu():
    calls = []
    plugin = plugin_module(
        "fake", dsv3_register_backends=lambda: [fake_backend(aliases=("phony",))],
        dsv3_backend_ops=lambda backend: {"rms_norm": counted_rms_norm(calls)} if backend in ("fake", "cpu") else None)
    reg = registry(FakeEntryPoint("fake", plugin))
    assert reg.backend("phony").name == "fake" and reg.backend_plugin["fake"] == "fake"
    ops = resolve_ops(reg, "cpu")
    assert ops.providers["rms_norm"] == "fake" and ops.providers["linear"] == "cpu"
    ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert calls == [1]
    # pinning the op back to the reference wins over the override
    assert resolve_ops(reg, "cpu", pins={"rms_norm": "cpu"}).rms_norm is reference.rms_norm


def test_fallback_warns_once_per_op_and_strict_refuses():
    plugin = plugin_module("fake", dsv3_register_backends=lambda: [fake_backend()],
                           dsv3_backend_ops=lambda backend: {"silu_mul": reference.silu_mul} if backend == "fake" else None)
    warnings = []
    reg = registry(FakeEntryPoint("fake", plugin), warnings=warnings)
    ops = resolve_ops(reg, "fake")
    missing = [op for op in OP_NAMES if op != "silu_mul"]
    assert warnings == [f"backend 'fake' has no {op!r}; using the reference implementation" for op in missing]
    assert ops.providers["silu_mul"] == "fake" and ops.providers["rope"] == "cpu (reference fallback)"
    with pytest.raises(PluginError, match="no implementation of embedding, rms_norm.*strict"):
        resolve_ops(reg, "fake", strict=True)
    with pytest.raises(PluginError, match="pins op 'rope' to plugin 'other'.*offering it: none"):
        resolve_ops(reg, "fake", pins={"rope": "other"})


def test_ops_are_resolved_once_per_model_build_not_per_token(tmp_path):
    from dsv3.llm import LLM
    from dsv3.checkpoints.synthetic import random_checkpoint
    asked = []

    def backend_ops(backend):
        asked.append(backend)
        return {"rms_norm": reference.rms_norm} if backend == "cpu" else None

    reg = registry(FakeEntryPoint("counting", plugin_module("counting", dsv3_backend_ops=backend_ops)))
    llm = LLM(random_checkpoint(tmp_path), backend="cpu", registry=reg)
    llm.generate_ids([[5, 6, 7]], max_new_tokens=6, ignore_eos=True)
    assert asked == ["cpu"]
    assert llm.ops.rms_norm is reference.rms_norm


def test_autoload_off_skips_entry_points_but_dash_p_loads_one(monkeypatch):
    plugin = plugin_module("fake", dsv3_register_backends=lambda: [fake_backend()])
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "fake" not in registry(FakeEntryPoint("fake", plugin)).backends
    assert "fake" in registry(FakeEntryPoint("fake", plugin), plugins=["fake"]).backends
    monkeypatch.delenv(AUTOLOAD_ENV)
    assert "fake" in registry(FakeEntryPoint("fake", plugin)).backends


def test_discovery_reads_the_dsv3_entry_point_group(monkeypatch):
    plugin = plugin_module("fake", dsv3_register_backends=lambda: [fake_backend()])
    seen = []

    def entry_points(group):
        seen.append(group)
        return [FakeEntryPoint("fake", plugin)]

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    assert "fake" in create_registry(warn=lambda m: None).backends and seen == ["dsv3"]


def test_dash_p_no_blocks_a_plugin_builtins_included():
    plugin = plugin_module("fake", dsv3_register_backends=lambda: [fake_backend()])
    reg = registry(FakeEntryPoint("fake", plugin), plugins=["no:fake", "no:cuda"])
    assert "fake" not in reg.backends and "cuda" not in reg.backends and "cpu" in reg.backends


def test_plugin_module_flag_and_env(tmp_path, monkeypatch):
    (tmp_path / "my_dsv3_plugin.py").write_text(
        "from dsv3.plugins import hookimpl\nfrom dsv3.plugins.hookspecs import BackendSpec\n"
        "@hookimpl\ndef dsv3_register_backends():\n"
        "    return [BackendSpec('mine', (), 'cpu', lambda: None, 'cpu', ('dense',))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mine" in registry(modules=["my_dsv3_plugin"]).backends
    assert "mine" in registry(plugins=["my_dsv3_plugin"]).backends          # -p also takes a module, as in pytest
    monkeypatch.setenv("DSV3_PLUGINS", "my_dsv3_plugin")
    assert "mine" in registry().backends
    with pytest.raises(PluginError, match="--plugin no_such_module: import failed: ModuleNotFoundError"):
        registry(modules=["no_such_module"])
    with pytest.raises(PluginError, match="-p nothing_here: no installed plugin has that entry-point name"):
        registry(plugins=["nothing_here"])


# -- broken plugins: each is named with its problem, the others keep working ------------------------------

def good_plugin(calls):
    return FakeEntryPoint("good", plugin_module(
        "good", dsv3_register_backends=lambda: [fake_backend("good")],
        dsv3_backend_ops=lambda backend: {"rms_norm": counted_rms_norm(calls)} if backend == "good" else None))


def assert_others_work(reg, calls):
    ops = resolve_ops(reg, "good", warn=lambda m: None)
    ops.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert calls == [1]
    assert resolve_ops(reg, "cpu").rms_norm is reference.rms_norm


def test_plugin_that_fails_to_import():
    calls, warnings = [], []
    reg = registry(FakeEntryPoint("broken", error=ImportError("No module named 'vendor_sdk'")), good_plugin(calls),
                   warnings=warnings)
    assert "import of 'fake_broken.plugin' failed: ImportError: No module named 'vendor_sdk'" in reg.failures["broken"]
    assert any(w.startswith("plugin 'broken': import of") for w in warnings)
    assert_others_work(reg, calls)


def test_plugin_whose_hookimpl_has_a_wrong_signature():
    calls = []
    bad = plugin_module("badsig", dsv3_register_backends=lambda: [fake_backend("badsig")],
                        dsv3_backend_ops=lambda backend, device: None)
    reg = registry(FakeEntryPoint("badsig", bad), good_plugin(calls))
    assert "dsv3_backend_ops" in reg.failures["badsig"] and "device" in reg.failures["badsig"]
    assert "badsig" not in reg.backends          # nothing of a rejected plugin is used
    assert_others_work(reg, calls)


def test_plugin_with_a_misspelt_hook():
    calls = []
    typo = plugin_module("typo", dsv3_backend_op=lambda backend: {"rms_norm": None})
    reg = registry(FakeEntryPoint("typo", typo), good_plugin(calls))
    assert "implements unknown hook 'dsv3_backend_op'; the hooks are: " in reg.failures["typo"]
    assert not reg.pm.has_plugin("typo")
    assert_others_work(reg, calls)


@pytest.mark.parametrize("claimed", ["cpu", "nvidia"])
def test_plugin_that_claims_an_existing_backend_name(claimed):
    calls, hijack = [], []
    thief = plugin_module(
        "thief", dsv3_register_backends=lambda: [fake_backend("thief", aliases=(claimed,))],
        dsv3_backend_ops=lambda backend: {"rms_norm": counted_rms_norm(hijack)})
    reg = registry(FakeEntryPoint("thief", thief), good_plugin(calls))
    owner = "cpu" if claimed == "cpu" else "cuda"
    assert reg.failures["thief"].startswith(f"declares backend name {claimed!r}, which plugin {owner!r} already provides")
    assert reg.backend(claimed).name == owner and "thief" not in reg.backends
    assert_others_work(reg, calls)
    assert hijack == []                           # its ops do not leak into the backend it tried to take


def test_plugin_whose_ops_hook_raises_or_returns_nonsense():
    calls = []
    raising = plugin_module("raising", dsv3_backend_ops=lambda backend: 1 / 0)
    nonsense = plugin_module("nonsense", dsv3_backend_ops=lambda backend: {"rmsnorm": reference.rms_norm})
    reg = registry(FakeEntryPoint("raising", raising), FakeEntryPoint("nonsense", nonsense), good_plugin(calls))
    assert_others_work(reg, calls)
    assert "ZeroDivisionError" in reg.failures["raising"]
    assert "unknown op name(s) 'rmsnorm'" in reg.failures["nonsense"]


def test_backend_whose_own_ops_fail_is_an_error_for_that_backend_only():
    owner = plugin_module("sdkless", dsv3_register_backends=lambda: [fake_backend("sdkless")],
                          dsv3_backend_ops=lambda backend: __import__("vendor_sdk_missing") if backend == "sdkless" else None)
    reg = registry(FakeEntryPoint("sdkless", owner))
    with pytest.raises(PluginError, match="plugin 'sdkless', which provides backend 'sdkless'.*vendor_sdk_missing"):
        plan_ops(reg, "sdkless")
    assert resolve_ops(reg, "cpu").linear is reference.linear


def test_backends_command_lists_every_backend_with_coverage(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for row in ("cpu      reference", "cuda     nvidia", "rocm     amd", "ascend   npu"):
        assert row in out
    assert "hardware here" in out and "dsv3 0.1.0, built-in" in out
    assert "where it is present: dsv3-run --backend cuda (profile cuda-fp8)" in out
    for op in OP_NAMES:      # the cpu column comes first; other backends' coverage is theirs to change
        assert f"\n{op:<18}  native" in out


def test_backends_command_reports_a_failed_plugin(capsys, monkeypatch):
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [FakeEntryPoint("broken", error=RuntimeError("boom"))])
    assert main(["backends"]) == 0
    captured = capsys.readouterr()
    assert "plugins that failed to load:\n  broken: import of 'fake_broken.plugin' failed: RuntimeError: boom" in captured.out
    assert "dsv3: warning: plugin 'broken'" in captured.err
