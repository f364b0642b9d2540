"""`dsv3-run convert` when things go wrong: a second converter, a changed shard, a kill at any point,
a full disk, bad arguments. Each test names the failure it guards against (issue #25, item 13-14)."""
import contextlib
import errno
import json
import os

import pytest
import torch

import dsv3.checkpoints.convert as convert_mod
from dsv3.commands.main import main
from dsv3.checkpoints.convert import ConversionError, convert_checkpoint

from helpers import make_checkpoint, tiny_config

SHARD = 200_000     # several output shards from the tiny checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("src") / "fp8", tiny_config(), seed=11, fmt="fp8-block",
                              num_shards=3, dtype=torch.bfloat16)
    return path


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory):
    """An uninterrupted bf16 conversion to compare the others with."""
    out = tmp_path_factory.mktemp("clean") / "bf16"
    convert_checkpoint(src, out, "bf16", max_shard_bytes=SHARD, progress=False, log=lambda m: None)
    return out


@contextlib.contextmanager
def _killed_at_the_rename_of(part, monkeypatch):
    """Within the block, renaming the partial directory `part` into place is a Ctrl-C."""
    real_replace = os.replace

    def killed(a, b, *args, **kwargs):
        if os.fspath(a) == os.fspath(part):
            raise KeyboardInterrupt
        return real_replace(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "replace", real_replace)


def _convert(src, dst, to="bf16", logs=None, **kw):
    return convert_checkpoint(src, dst, to, max_shard_bytes=SHARD, progress=False,
                              log=(logs.append if logs is not None else lambda m: None), **kw)


def _same_files(a, b):
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in b.iterdir():
        assert (a / f.name).read_bytes() == f.read_bytes(), f.name


def _die_at(monkeypatch, n, exc=KeyboardInterrupt):
    """Make the n-th converted tensor raise `exc` (a kill, from the converter's point of view)."""
    real, calls = convert_mod._convert_job, {"n": 0}

    def job(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(convert_mod, "_convert_job", job)
    return lambda: monkeypatch.setattr(convert_mod, "_convert_job", real)


def test_a_second_converter_leaves_the_first_ones_work_alone(src, clean, tmp_path, monkeypatch):
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    real, seen = convert_mod._convert_job, {}

    def job(*args, **kwargs):
        if not seen and part.is_dir() and any(part.glob("*.incomplete")):
            before = sorted(p.name for p in part.iterdir())
            # another command for the same DST starts meanwhile (a different target: the old code
            # saw a "different conversion" and deleted the live partial directory)
            monkeypatch.setattr(convert_mod, "_convert_job", real)
            with pytest.raises(ConversionError, match="being written by another `dsv3-run convert`"):
                _convert(src, dst, "fp8-fnuz")
            monkeypatch.setattr(convert_mod, "_convert_job", job)
            seen["after"] = sorted(p.name for p in part.iterdir()) if part.is_dir() else []
            seen["before"] = before
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "_convert_job", job)
    _convert(src, dst)
    assert seen["after"] == seen["before"]
    _same_files(dst, clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]     # no lock file left behind


def test_resume_converts_again_a_shard_whose_bytes_changed(src, clean, tmp_path, monkeypatch):
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    restore = _die_at(monkeypatch, 30)
    with pytest.raises(KeyboardInterrupt):
        _convert(src, dst)
    restore()
    finished = sorted(part.glob("model-*.safetensors"))
    assert finished
    data = bytearray(finished[0].read_bytes())
    data[-3] ^= 0x10                  # one flipped bit in the last tensor; the size stays the same
    finished[0].write_bytes(bytes(data))
    logs = []
    report = _convert(src, dst, logs=logs)
    assert any("differs from what was written" in m and finished[0].name in m for m in logs), logs
    assert report.shards_resumed == len(finished) - 1
    _same_files(dst, clean)


def test_overwrite_killed_between_its_renames_is_repaired_by_the_next_run(src, clean, tmp_path, monkeypatch):
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    _convert(src, dst, "fp8-fnuz")
    with _killed_at_the_rename_of(part, monkeypatch), pytest.raises(KeyboardInterrupt):
        _convert(src, dst, overwrite=True)        # killed between moving the old DST aside and the new one in
    assert not dst.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
    logs = []
    report = _convert(src, dst, overwrite=True, logs=logs)
    assert any("restored" in m for m in logs), logs
    assert report.shards_written == 0                   # every finished shard was kept
    _same_files(dst, clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # killed while deleting the replaced copy: the next run (even one that then refuses) removes it
    real_rmtree = convert_mod.shutil.rmtree

    def killed_in_rmtree(path, *args, **kwargs):
        if ".old-" in os.fspath(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(convert_mod.shutil, "rmtree", killed_in_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _convert(src, dst, overwrite=True)
    monkeypatch.setattr(convert_mod.shutil, "rmtree", real_rmtree)
    with pytest.raises(ConversionError, match="already exists"):
        _convert(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _same_files(dst, clean)


def test_a_kill_after_the_last_shard_resumes_instead_of_starting_over(src, clean, tmp_path, monkeypatch):
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    with _killed_at_the_rename_of(part, monkeypatch), pytest.raises(KeyboardInterrupt):
        _convert(src, dst)
    logs = []
    report = _convert(src, dst, logs=logs)
    assert not any("different conversion" in m or "starting over" in m for m in logs), logs
    assert report.shards_written == 0 and report.shards_resumed >= 2
    _same_files(dst, clean)


def test_a_full_disk_stops_cleanly_and_the_same_command_resumes(src, clean, tmp_path, monkeypatch, capsys):
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    real, calls = convert_mod.SafetensorsWriter.write, {"n": 0}

    def write(self, name, t):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, name, t)

    monkeypatch.setattr(convert_mod.SafetensorsWriter, "write", write)
    monkeypatch.setattr(convert_mod, "parse_size", lambda text: SHARD)    # below the CLI's 1 MiB minimum
    argv = ["convert", str(src), str(dst), "--to", "bf16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no space left" in err[0], err
    assert "run the same command again to resume" in err[0]
    assert not dst.exists() and list(part.glob("model-*.safetensors")) and not list(part.glob("*.incomplete"))
    monkeypatch.setattr(convert_mod.SafetensorsWriter, "write", real)
    assert main(argv) == 0
    assert "resumed" in capsys.readouterr().out
    _same_files(dst, clean)


def test_overwrite_onto_a_file_is_refused_and_the_file_kept(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.write_text("not a checkpoint")
    assert main(["convert", str(src), str(dst), "--to", "bf16", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert dst.read_text() == "not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_arguments_get_one_error_line(src, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "deepseek_v3",')     # cut short: not JSON
    for argv, pattern in [([str(broken), str(tmp_path / "o1"), "--to", "bf16"], "not valid JSON"),
                          ([str(src), str(tmp_path / "o2"), "--to", "bf16", "--device", "foo"], "not a torch device"),
                          ([str(tmp_path / "nope"), str(tmp_path / "o3"), "--to", "bf16"], "no such directory")]:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and pattern in err, err
        assert "--model" not in err, err                 # convert has no --model flag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_side_file_linking_out_of_the_checkpoint_is_refused_not_copied(tmp_path, capsys):
    """A tokenizer.json that is a symlink to a file outside the checkpoint (here a stand-in for a secret)
    must not be copied into the output: convert refuses before doing any work, naming the link."""
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("do not copy me")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").symlink_to(secret)
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: links to" in err and "outside the model directory" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
