"""Robustness of loading (issue #25, items 8-11): non-finite weights, absurd sizes, malformed config,
tokenizer_config and profile values, FIFOs and symlinks. Each case is a Dsv3Error that names the file
and the key or tensor, never a traceback, a hang or a huge allocation."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import LLM
from dsv3.commands.main import main
from dsv3.core.config import ModelConfig
from dsv3.checkpoints.convert import convert_checkpoint
from dsv3.core.errors import CheckpointError, ConfigError, Dsv3Error, ProfileError
from dsv3.core.loader import Checkpoint
from dsv3.core.profile import Profile, load_profile, validate_for_backend, with_overrides
from dsv3.core.tokenizer import Tokenizer
from dsv3.parallel import memory
from dsv3.plugins.manager import create_registry

from helpers import fp8_checkpoint, make_checkpoint, tiny_config

ST = "model.safetensors"
V3_CONFIG = "/work/shared/reference/deepseek-v3/config.json"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("dense") / "ckpt", tiny_config(), seed=21)
    return path


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return fp8_checkpoint(tmp_path_factory, "fp8", seed=22)


@pytest.fixture(scope="module")
def reg():
    return create_registry(autoload=False, entry_points=(), warn=lambda m: None)


def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_tensors(path, fn):
    tensors = load_file(path / ST)
    fn(tensors)
    save_file(tensors, path / ST)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _fails(exc, *needles, **llm_kw):
    """LLM(...) raises `exc` whose message holds every needle; returns the message."""
    model = llm_kw.pop("model")
    with pytest.raises(exc) as e:
        LLM(model, backend="cpu", **llm_kw)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    return str(e.value)


# -- 8. NaN / Inf weights are refused at load, naming the tensor ----------------------------------------

@pytest.mark.parametrize("name, value", [
    ("model.layers.0.self_attn.q_a_proj.weight", float("nan")),     # a projection (converted in chunks)
    ("model.layers.1.mlp.experts.3.down_proj.weight", float("inf")),  # a routed expert, stacked at load
    ("model.norm.weight", float("-inf")),                             # a plain parameter
    ("model.embed_tokens.weight", float("nan")),
])
def test_non_finite_dense_weight_is_refused(dense, tmp_path, name, value):
    bad = _copy(dense, tmp_path)
    _edit_tensors(bad, lambda t: t[name].view(-1).__setitem__(7, value))
    msg = _fails(CheckpointError, name, "NaN or Inf", model=bad)
    assert ST in msg


def test_fp8_nan_encoding_is_refused(fp8, tmp_path):
    name = "model.layers.2.mlp.shared_experts.up_proj.weight"
    bad = _copy(fp8, tmp_path)

    def poison(t):
        bits = t[name].view(torch.uint8).clone()
        bits.view(-1)[5] = 0xFF                   # e4m3fn NaN (0x7F / 0xFF); e4m3fn has no Inf
        t[name] = bits.view(torch.float8_e4m3fn)
    _edit_tensors(bad, poison)
    for fmt in ("fp8-block", "dense", "fp8-fnuz"):   # kept as stored, dequantised, reinterpreted for MI300
        _fails(CheckpointError, name, "NaN or Inf", model=bad, weight_format=fmt)


def test_fp8_non_finite_scale_is_refused(fp8, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    bad = _copy(fp8, tmp_path)
    _edit_tensors(bad, lambda t: t[name].view(-1).__setitem__(0, float("inf")))
    _fails(CheckpointError, name, "NaN or Inf", model=bad, weight_format="fp8-block")


def test_value_beyond_float16_range_is_refused(dense, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = _copy(dense, tmp_path)
    _edit_tensors(bad, lambda t: t[name].view(-1).__setitem__(3, 1e6))
    LLM(bad, backend="cpu")                                            # finite in float32: fine
    _fails(CheckpointError, name, "float16", "--dtype", model=bad, dtype="float16")


def test_finite_checkpoint_still_loads(fp8):
    llm = LLM(fp8, backend="cpu", weight_format="fp8-block")
    assert torch.isfinite(llm.logits([[2, 3, 4]])).all()


# -- 9. absurd sizes are refused before anything is allocated ----------------------------------------

@pytest.mark.parametrize("key, value", [
    ("hidden_size", 10**9), ("n_routed_experts", 10**7), ("max_position_embeddings", 10**10),
    ("num_hidden_layers", 10**6), ("vocab_size", 10**12), ("num_attention_heads", 10**8),
])
def test_absurd_config_size_names_the_key(dense, tmp_path, key, value):
    bad = _copy(dense, tmp_path)
    _edit_config(bad, **{key: value})
    start = time.monotonic()
    msg = _fails(ConfigError, key, "config.json", model=bad)
    assert time.monotonic() - start < 5 and len(msg) < 400


def test_absurd_cache_size_names_the_key(dense):
    msg = _fails(ProfileError, "kv_cache.max_tokens", model=dense, **{"kv_cache.max_tokens": 10**12})
    assert "--max-cache-tokens" in msg


def _v3():
    return ModelConfig.from_file(V3_CONFIG)


def test_memory_check_names_what_does_not_fit(monkeypatch):
    cfg, profile = _v3(), load_profile("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * memory.GiB)
    with pytest.raises(ConfigError) as e:    # 671B parameters on a 64 GiB host: the routed experts dominate
        memory.check_fits(cfg, profile, torch.device("cpu"), "fp8-block", with_mtp=True, source="m/config.json")
    assert "n_routed_experts = 256" in str(e.value) and "64.0 GiB" in str(e.value) and "dsv3-run plan" in str(e.value)

    small = dataclasses.replace(cfg, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_group=8,
                                topk_group=4)
    big_cache = with_overrides(profile, {"kv_cache.max_tokens": 2**30})
    with pytest.raises(ProfileError) as e:   # the model fits, a billion cached tokens do not
        memory.check_fits(small, big_cache, torch.device("cpu"), "fp8-block", with_mtp=False)
    assert "kv_cache.max_tokens = 1073741824" in str(e.value) and "at most" in str(e.value)
    memory.check_fits(small, profile, torch.device("cpu"), "fp8-block", with_mtp=False)   # fits: no error


def test_memory_check_uses_device_memory():
    assert memory.available_bytes(torch.device("cpu")) > 0
    assert memory.available_bytes(torch.device("meta")) is None     # nothing to check against


# -- 10. malformed config.json values ------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"quantization_config": ["fp8"]}, "quantization_config"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}, "weight_block_size"),
    ({"rope_scaling": {**tiny_config()["rope_scaling"], "factor": "x"}}, "rope_scaling.factor"),
    ({"rope_scaling": {**tiny_config()["rope_scaling"], "factor": 0}}, "rope_scaling.factor"),
    ({"rope_scaling": {**tiny_config()["rope_scaling"], "beta_fast": None, "beta_slow": -1}}, "rope_scaling.beta_slow"),
    ({"rope_scaling": {**tiny_config()["rope_scaling"], "original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
    ({"rope_scaling": {**tiny_config()["rope_scaling"], "mscale": "big"}}, "rope_scaling.mscale"),
    ({"rope_theta": "x"}, "rope_theta"),
    ({"rope_theta": 1}, "rope_theta"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"max_position_embeddings": -5}, "max_position_embeddings"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"n_group": "4"}, "n_group"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ({"eos_token_id": {"id": 1}}, "eos_token_id"),
    ({"bos_token_id": "<s>"}, "bos_token_id"),
    ({"model_type": ["deepseek_v3"] * 10**5}, "model_type"),
])
def test_malformed_config_value_names_the_key(change, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(tiny_config(**change), source="m/config.json")
    assert needle in str(e.value) and "m/config.json" in str(e.value) and len(str(e.value)) < 400


def test_deeply_nested_config(dense, tmp_path):
    bad = _copy(dense, tmp_path)
    cfg = (bad / "config.json").read_text()
    (bad / "config.json").write_text(cfg[:-1] + ', "junk": ' + "[" * 10**5 + "]" * 10**5 + "}")
    _fails(ConfigError, "config.json", "nested", model=bad)


def test_config_not_utf8(dense, tmp_path):
    bad = _copy(dense, tmp_path)
    (bad / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    _fails(ConfigError, "config.json", "UTF-8", model=bad)


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not valid JSON"),
    (b'{"chat_template": "\xff"}', "UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'{"bos_token": 5}', "bos_token"),
    (b'{"chat_template": {"a": 1}}', "chat_template"),
    (b"[" * 10**5 + b"]" * 10**5, "nested"),
])
def test_malformed_tokenizer_config(dense, tmp_path, content, needle):
    bad = _copy(dense, tmp_path)
    (bad / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        Tokenizer(bad)
    assert "tokenizer_config.json" in str(e.value) and needle in str(e.value)


def test_named_chat_templates_are_read(dense, tmp_path):
    good = _copy(dense, tmp_path)
    cfg = json.loads((good / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (good / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(good).chat_template == "D"


# -- 10. malformed profiles -----------------------------------------------------------------------------

def _profile(tmp_path, content: bytes | str):
    path = tmp_path / "p.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_profile_nested_too_deeply(tmp_path):
    with pytest.raises(ProfileError, match="nest"):
        load_profile(_profile(tmp_path, "backend: cpu\nops: " + "[" * 20000 + "]" * 20000 + "\n"))
    start = time.monotonic()
    with pytest.raises(ProfileError, match="too large for a profile"):   # 1e5 deep: refused by size, at once
        load_profile(_profile(tmp_path, "backend: cpu\nops: " + "[" * 10**5 + "]" * 10**5 + "\n"))
    assert time.monotonic() - start < 1


def test_profile_not_utf8(tmp_path):
    with pytest.raises(ProfileError, match="UTF-8"):
        load_profile(_profile(tmp_path, b"backend: cpu\ndescription: \xff\xfe\n"))


def _laughs(levels=9) -> str:
    """A YAML flow value of 9**levels strings in a few hundred bytes (each level defines and reuses an alias)."""
    value = "&a0 [" + ", ".join(["lol"] * 9) + "]"
    for i in range(1, levels + 1):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return value


@pytest.mark.parametrize("template", ["description: {}", "ops: {}", "ops: {{mla_decode: {}}}", "dtype: {}",
                                      "kv_cache: {}", "kv_cache: {{max_tokens: {}}}", "? {}\n: 1"])
def test_billion_laughs_profile_is_refused_quickly_and_briefly(tmp_path, template):
    start = time.monotonic()
    with pytest.raises(ProfileError) as e:
        load_profile(_profile(tmp_path, "backend: cpu\n" + template.format(_laughs()) + "\n"))
    assert time.monotonic() - start < 2 and len(str(e.value)) < 500, len(str(e.value))


@pytest.mark.parametrize("key, value, needle", [
    ("speculative.num_draft_tokens", 10**6, "speculative.num_draft_tokens"),
    ("kv_cache.block_size", 10**9, "kv_cache.block_size"),
    ("max_batch_tokens", 10**12, "max_batch_tokens"),
    ("parallel.tp", 10**6, "parallel.tp"),
])
def test_absurd_profile_values(key, value, needle):
    with pytest.raises(ProfileError) as e:
        with_overrides(Profile(), {key: value})
    assert needle in str(e.value) and len(str(e.value)) < 400


def test_cache_too_small_for_the_drafts():
    with pytest.raises(ProfileError, match="kv_cache.max_tokens"):
        with_overrides(Profile(), {"kv_cache.block_size": 1, "kv_cache.max_tokens": 4,
                                   "speculative.method": "mtp", "speculative.num_draft_tokens": 4})


def test_profile_device_meta_is_refused():
    with pytest.raises(ProfileError, match="device = 'meta' is invalid; the meta device holds no data"):
        with_overrides(Profile(), {"device": "meta"})


def test_cli_device_meta_is_one_line(dense, capsys):
    assert main(["--model", str(dense), "--device", "meta", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "meta" in err


# -- 11. FIFOs and symlinks ----------------------------------------------------------------------------

def _in_thread(fn, timeout=10):
    """fn() on a daemon thread: (finished, its exception)."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("e")


def _unblock(fifo):
    """Open the FIFO for writing so a reader blocked on it (a failing fix) returns."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("what", ["load", "convert"])
def test_fifo_shard_does_not_block(dense, tmp_path, what):
    bad = _copy(dense, tmp_path)
    (bad / ST).unlink()
    os.mkfifo(bad / ST)
    out = tmp_path / "out"
    run = (lambda: Checkpoint(bad)) if what == "load" else (
        lambda: convert_checkpoint(bad, out, "bf16", progress=False, log=lambda m: None))
    finished, err = _in_thread(run, timeout=10)
    if not finished:
        _unblock(bad / ST)
    assert finished, "opening a FIFO shard blocked"
    assert isinstance(err, CheckpointError) and "not a regular file" in str(err) and ST in str(err), err
    assert not out.exists()


def test_fifo_config_json(dense, tmp_path):
    bad = _copy(dense, tmp_path)
    (bad / "config.json").unlink()
    os.mkfifo(bad / "config.json")
    finished, err = _in_thread(lambda: LLM(bad, backend="cpu"))
    if not finished:
        _unblock(bad / "config.json")
    assert finished and isinstance(err, CheckpointError) and "config.json" in str(err) and "regular file" in str(err)


@pytest.mark.parametrize("name", [ST, "config.json"])
def test_symlink_outside_the_model_directory_is_refused(dense, tmp_path, name):
    bad = _copy(dense, tmp_path)
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(bad / name, outside)
    (bad / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        Checkpoint(bad)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        convert_checkpoint(bad, tmp_path / "out", "bf16", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_symlinks_inside_and_the_hugging_face_cache_layout_load(dense, tmp_path):
    inside = _copy(dense, tmp_path, "inside")
    shutil.move(inside / ST, inside / "real.bin-renamed")
    (inside / ST).symlink_to("real.bin-renamed")
    assert Checkpoint(inside).names()

    repo = tmp_path / "hub" / "models--org--m"      # huggingface_hub: snapshots/REV/* -> ../../blobs/HASH
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(dense.iterdir())):
        shutil.copy(f, blobs / f"hash{i}")
        (snap / f.name).symlink_to(f"../../blobs/hash{i}")
    LLM(snap, backend="cpu")


def test_index_shard_that_is_a_fifo(tmp_path):
    path, _ = make_checkpoint(tmp_path / "sharded", tiny_config(), seed=3, num_shards=2, tokenizer=False)
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    finished, err = _in_thread(lambda: Checkpoint(path))
    if not finished:
        _unblock(shard)
    assert finished and isinstance(err, CheckpointError) and "not a regular file" in str(err), err


def test_every_error_here_is_a_dsv3_error():
    for cls in (CheckpointError, ConfigError, ProfileError):
        assert issubclass(cls, Dsv3Error)


def test_llm_refuses_what_the_machine_cannot_hold_before_allocating(tmp_path, capsys):
    """The fit check runs inside LLM(), before the model is built: a latent cache larger than this
    machine's memory is a ProfileError naming kv_cache.max_tokens, not an allocation failure."""
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config())
    huge = 2_000_000_000                             # tokens; at ~1 KB each, far beyond this host
    with pytest.raises(ProfileError, match=r"kv_cache\.max_tokens = 2000000000 needs .* at most \d+ tokens fit"):
        LLM(path, backend="cpu", **{"kv_cache.max_tokens": huge})
    assert main(["--model", str(path), "--prompt", "hi", "--max-cache-tokens", str(huge)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max-cache-tokens" in err and "Traceback" not in err
