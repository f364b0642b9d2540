"""Robustness of plugin loading (issue #25, item 12): a plugin whose import raises SystemExit or
KeyboardInterrupt, or hangs, is reported by name and left out; every command, `backends` included,
keeps working; Ctrl-C during a plugin's import names the plugin."""
from __future__ import annotations

import signal
import sys
import threading
import time
import types

import pytest

from dsv3.commands.main import main
from dsv3.core.errors import PluginError
from dsv3.plugins import hookimpl
from dsv3.plugins.hookspecs import BackendSpec
from dsv3.plugins.manager import AUTOLOAD_ENV, TIMEOUT_ENV, create_registry


class FakeEntryPoint:
    """An entry point of group dsv3 whose load() runs `load`."""

    def __init__(self, name: str, load):
        self.name, self.value, self.group, self.dist = name, f"fake_{name}.plugin", "dsv3", None
        self._load = load

    def load(self):
        return self._load()


def good_plugin() -> types.ModuleType:
    module = types.ModuleType("fake_good")
    module.dsv3_register_backends = hookimpl(lambda: [BackendSpec(
        name="good", aliases=(), device_type="cpu", probe=lambda: None, default_profile="cpu",
        weight_formats=("dense",))])
    return module


def raises(exc):
    def load():
        raise exc
    return load


@pytest.fixture
def gate():
    """An event a hanging plugin waits on; set at teardown so its thread ends."""
    event = threading.Event()
    yield event
    event.set()


@pytest.mark.parametrize("exc, shown", [(SystemExit(3), "SystemExit: 3"), (KeyboardInterrupt(), "KeyboardInterrupt"),
                                        (GeneratorExit(), "GeneratorExit")])
def test_plugin_raising_a_base_exception_on_import_is_contained(exc, shown):
    warnings = []
    reg = create_registry(entry_points=[FakeEntryPoint("bad", raises(exc)), FakeEntryPoint("good", good_plugin)],
                          warn=warnings.append)
    assert reg.backend("good").name == "good"                      # the others still load
    assert shown in reg.failures["bad"] and "fake_bad.plugin" in reg.failures["bad"]
    assert any(w.startswith("plugin 'bad': import of 'fake_bad.plugin' failed") and AUTOLOAD_ENV in w
               for w in warnings)


def test_hanging_plugin_import_times_out(gate, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "0.3")
    warnings = []
    start = time.monotonic()
    reg = create_registry(entry_points=[FakeEntryPoint("slow", gate.wait), FakeEntryPoint("good", good_plugin)],
                          warn=warnings.append)
    assert time.monotonic() - start < 5
    assert reg.backend("good").name == "good"
    assert "did not finish within 0.3 s" in reg.failures["slow"] and TIMEOUT_ENV in reg.failures["slow"]
    assert any("plugin 'slow'" in w and AUTOLOAD_ENV in w for w in warnings)


def test_backends_command_survives_a_hanging_plugin(gate, monkeypatch, capsys):
    monkeypatch.setenv(TIMEOUT_ENV, "0.3")
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group=None: [FakeEntryPoint("slow", gate.wait)] if group == "dsv3" else [])
    start = time.monotonic()
    assert main(["backends"]) == 0
    out, err = capsys.readouterr()
    assert time.monotonic() - start < 30
    assert "cpu" in out and "plugin 'slow'" in err and "did not finish" in err


def test_autoload_off_skips_a_hanging_plugin(gate, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monkeypatch.setenv(TIMEOUT_ENV, "30")
    start = time.monotonic()
    reg = create_registry(entry_points=[FakeEntryPoint("slow", gate.wait)], warn=lambda m: None)
    assert time.monotonic() - start < 5 and not reg.failures


def test_ctrl_c_during_a_plugin_import_names_the_plugin(gate):
    main_thread = threading.main_thread().ident

    def load():     # the user presses Ctrl-C while this import hangs
        signal.pthread_kill(main_thread, signal.SIGINT)
        gate.wait()
    warnings = []
    with pytest.raises(KeyboardInterrupt):
        create_registry(entry_points=[FakeEntryPoint("stuck", load)], warn=warnings.append)
    assert any("interrupted while importing plugin 'stuck' (fake_stuck.plugin)" in w and AUTOLOAD_ENV in w
               for w in warnings)


def test_explicit_plugin_module_exiting_is_a_plugin_error(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit('bye')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"--plugin exits_on_import: import failed: SystemExit: bye \(a plugin "
                                          r"must not exit the program\)"):
        create_registry(modules=["exits_on_import"], entry_points=(), warn=lambda m: None)
    sys.modules.pop("exits_on_import", None)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "inf"])
def test_bad_timeout_value(value, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(PluginError, match=TIMEOUT_ENV):
        create_registry(entry_points=[FakeEntryPoint("good", good_plugin)], warn=lambda m: None)
