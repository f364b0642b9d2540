"""Profiles: every shipped one validates; each kind of bad profile says file, key, value and what is allowed;
CLI precedence: --backend's default profile < --profile < flags."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dsv3.commands.main import main
from dsv3.commands.options import add_runtime_args, build_llm
from dsv3.core.errors import PluginError, ProfileError
from dsv3.core.profile import (CONFIG_DIR, load_profile, profile_names, select_profile, validate_for_backend,
                               with_overrides)
from dsv3.plugins.manager import create_registry

SHIPPED = ["ascend-bf16", "ascend-w8a8", "cpu", "cuda-bf16", "cuda-fp8", "rocm-fp8"]


@pytest.fixture(scope="module")
def reg():
    return create_registry(autoload=False, entry_points=(), warn=lambda m: None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dsv3.checkpoints.synthetic import random_checkpoint
    return str(random_checkpoint(tmp_path_factory.mktemp("tiny")))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_validates_against_its_backend(name, reg):
    profile = load_profile(name)
    assert profile.source == str(CONFIG_DIR / f"{name}.yaml") and profile.description
    validate_for_backend(profile, reg.backend(profile.backend))


def test_every_backend_default_profile_is_shipped(reg):
    assert profile_names() == SHIPPED
    for spec in reg.backends.values():
        assert load_profile(spec.default_profile).backend == spec.name


@pytest.mark.parametrize("text, message", [
    ("backend: cpu\nkv_cahce: {dtype: auto}\n",
     "unknown key 'kv_cahce' (did you mean 'kv_cache'?); allowed keys: backend, device, dtype"),
    ("backend: cpu\nkv_cache: {dtype: auto, blocks: 64}\n",
     "unknown key 'kv_cache.blocks' (did you mean 'kv_cache.block_size'?); allowed keys under kv_cache: dtype, block_size"),
    ("backend: cpu\ndtype: float8\n", "dtype = 'float8' is invalid; allowed: float32, bfloat16, float16"),
    ("backend: cpu\nweight_format: fp4\n", "weight_format = 'fp4' is invalid; allowed: auto, dense, fp8-block"),
    ("backend: cpu\nkv_cache: {block_size: 0}\n", "kv_cache.block_size = 0 is invalid; must be >= 1"),
    ("backend: cpu\nmax_batch_tokens: lots\n", "max_batch_tokens = 'lots' is invalid; expected an integer"),
    ("backend: cpu\ncuda_graphs: sometimes\n", "cuda_graphs = 'sometimes' is invalid; expected true or false"),
    ("backend: cpu\nparallel: 2\n", "parallel must be a mapping, got 2"),
    ("backend: cpu\nspeculative: {method: medusa}\n", "speculative.method = 'medusa' is invalid; allowed: none, mtp"),
    ("backend: cpu\nops: {rmsnorm: cpu}\n", "ops.rmsnorm: unknown op; known ops: embedding, rms_norm"),
    ("backend: cpu\ndevice: 'cuda 1'\n", "device = 'cuda 1' is invalid; expected a torch device"),
    ("backend: [cpu\n", "not valid YAML"),
])
def test_bad_profile_names_file_key_value_and_what_is_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("backend: ascend\nweight_format: fp8-block\n",
     "weight_format = 'fp8-block' cannot run on backend 'ascend'; it runs: dense, int8-w8a8"),
    ("backend: cpu\nkv_cache: {dtype: float8_e4m3fn}\n",
     "kv_cache.dtype = 'float8_e4m3fn' is not supported by backend 'cpu'; it supports: float32, bfloat16, float16"),
    ("backend: cpu\ncuda_graphs: true\n", "cuda_graphs = true needs a CUDA device; backend 'cpu' runs on 'cpu'"),
])
def test_impossible_combination_is_an_error_before_any_weight_is_loaded(tmp_path, reg, text, message):
    from dsv3.llm import LLM
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(str(tmp_path / "no-such-checkpoint"), profile=path, registry=reg)  # the checkpoint is never opened


def test_unknown_backend_in_a_profile(tmp_path, reg):
    path = write(tmp_path, "backend: tpu\n")
    with pytest.raises(ProfileError, match=f"{path}: backend = 'tpu' is not a known backend; known: amd, ascend"):
        select_profile(reg, profile=path)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ProfileError, match="unknown profile 'cuda-fp4'; shipped profiles: ascend-bf16, ascend-w8a8, cpu"):
        load_profile("cuda-fp4")


def test_strict_profile_refuses_reference_fallbacks(tmp_path, monkeypatch):
    from dsv3.llm import LLM
    (tmp_path / "partial_backend.py").write_text(
        "from dsv3.plugins import hookimpl\nfrom dsv3.plugins.hookspecs import BackendSpec\n"
        "@hookimpl\ndef dsv3_register_backends():\n"
        "    return [BackendSpec('partial', (), 'cpu', lambda: None, 'cpu', ('dense',))]\n"
        "@hookimpl\ndef dsv3_backend_ops(backend):\n"
        "    return {'silu_mul': lambda gate, up: gate} if backend == 'partial' else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = create_registry(autoload=False, entry_points=(), modules=["partial_backend"], warn=lambda m: None)
    path = write(tmp_path, "backend: partial\nstrict: true\n")
    with pytest.raises(PluginError, match="backend 'partial' has no implementation of embedding, .* the profile is strict"):
        LLM(str(tmp_path / "no-such-checkpoint"), profile=path, registry=reg)


# -- precedence: --backend X = X's default profile; --profile NAME|PATH; flags override fields ------------

def test_backend_selects_its_default_profile(reg):
    assert select_profile(reg, backend="nvidia").source.endswith("cuda-fp8.yaml")
    assert select_profile(reg, backend="npu").source.endswith("ascend-w8a8.yaml")
    assert select_profile(reg).source.endswith("cpu.yaml")


def test_profile_by_name_or_path_and_flags_override_fields(tmp_path, reg):
    assert select_profile(reg, profile="cuda-bf16").weight_format == "dense"
    path = write(tmp_path, "backend: cpu\ndtype: float32\nkv_cache: {max_tokens: 4096, block_size: 32}\n")
    p = select_profile(reg, backend="reference", profile=path,
                       overrides={"dtype": "bfloat16", "kv_cache.max_tokens": 1024, "device": None})
    assert (p.dtype, p.kv_cache.max_tokens, p.kv_cache.block_size, p.device) == ("bfloat16", 1024, 32, None)
    assert p.source == path
    with pytest.raises(ProfileError, match=r"backend 'cuda' \(--backend, or LLM's backend=\) contradicts profile .*cpu.yaml \(backend 'cpu'\)"):
        select_profile(reg, backend="cuda", profile="cpu")
    with pytest.raises(ProfileError, match=r"\+ overrides \(flags or LLM keyword arguments\): kv_cache.max_tokens = 0 is invalid"):
        with_overrides(p, {"kv_cache.max_tokens": 0})


def test_cli_flags_override_the_profile_file(tmp_path, tiny_model):
    path = write(tmp_path, "backend: cpu\ndtype: float32\nweight_format: dense\nkv_cache: {max_tokens: 4096}\n")
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    args = parser.parse_args(["--model", tiny_model, "--profile", path, "--dtype", "bfloat16",
                              "--weight-format", "int8-w8a8", "--max-cache-tokens", "2048"])
    llm = build_llm(args)
    assert (llm.profile.dtype, llm.profile.weight_format, llm.profile.kv_cache.max_tokens) == ("bfloat16", "int8-w8a8", 2048)
    assert llm.profile.kv_cache.block_size == 64 and llm.weight_format == "int8-w8a8"


def test_cli_reports_profile_errors(tmp_path, capsys):
    path = write(tmp_path, "backend: ascend\nweight_format: fp8-block\n")
    assert main(["--profile", path, "--prompt", "x"]) == 2
    assert f"error: {path}: weight_format = 'fp8-block' cannot run on backend 'ascend'" in capsys.readouterr().err


def test_profiles_command_lists_and_shows(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert f"\n{name} " in out
    assert "--backend cuda" in out and "--backend ascend" in out
    assert main(["profiles", "ascend-w8a8"]) == 0
    shown = capsys.readouterr().out
    assert "weight_format: int8-w8a8" in shown and "block_size: 128" in shown and "strict: false" in shown
