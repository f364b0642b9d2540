"""`dsv3-run` end to end on a tiny checkpoint, and one clear error line for each kind of bad input."""
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from dsv3.commands.main import main

from helpers import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(), seed=7, fmt="fp8-block")
    return path


def test_prompt_streams_completion(ckpt, capsys):
    assert main(["--model", str(ckpt), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello world") and len(out) > len("hello world\n")


def test_input_file_one_completion_per_line(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("hello world\ndef add(a, b):\nBeautiful is\n")
    assert main(["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "4", "--temperature", "0.8",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 3
    main(["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3"])
    assert capsys.readouterr().out.splitlines() == first    # same seed, same text


def test_interactive_chat_through_stdin(ckpt):
    script = "hello\n/clear\nhi again\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "dsv3.commands.main", "--model", str(ckpt), "--interactive",
                        "--max-new-tokens", "3"], input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "history cleared" in r.stderr
    assert r.stdout.count("> ") >= 3   # a prompt before each line read


def _expect_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert pattern in err, err


def _copy(ckpt, dst):
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_inputs(ckpt, tmp_path, capsys):
    _expect_error(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "x"], "no such directory")
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, ["--model", str(tmp_path / "empty"), "--prompt", "x"], "no config.json")

    bad_type = _copy(ckpt, tmp_path / "bad_type")
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _expect_error(capsys, ["--model", str(bad_type), "--prompt", "x"], "model_type")

    truncated = _copy(ckpt, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(capsys, ["--model", str(truncated), "--prompt", "x"], "truncated")

    missing = _copy(ckpt, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    _expect_error(capsys, ["--model", str(missing), "--prompt", "x"], "model.layers.0.self_attn.o_proj.weight")

    misshapen = _copy(ckpt, tmp_path / "misshapen")
    tensors = load_file(misshapen / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, misshapen / "model.safetensors")
    _expect_error(capsys, ["--model", str(misshapen), "--prompt", "x"], "model.norm.weight")

    long_prompt = "hello world " * 1000   # far beyond max_position_embeddings = 1024
    _expect_error(capsys, ["--model", str(ckpt), "--prompt", long_prompt], "context")
    _expect_error(capsys, ["--model", str(ckpt), "--backend", "quantum", "--prompt", "x"], "unknown backend")


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsv3.commands.main", "--model", str(tmp_path / "nope"), "--debug"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_console_script_help():
    r = subprocess.run(["dsv3-run", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "subcommands" in r.stdout
