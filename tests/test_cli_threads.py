"""The CPU thread count a command picks: --threads, else OMP_NUM_THREADS (torch's own), else one thread
for a small checkpoint (the demo model: a second thread costs several times over on a busy machine)."""
import argparse

import pytest

from dsv3.commands import options
from dsv3.commands.main import main


def args(model=None, threads=None):
    return argparse.Namespace(model=model, threads=threads)


def test_small_checkpoints_get_one_thread_large_ones_torchs_default(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert options.cpu_threads(args()) == 1                          # the embedded demo model
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    (small / "model.safetensors").write_bytes(b"x" * 1000)
    with open(large / "model-00001-of-00002.safetensors", "wb") as f:  # sparse: sizes without the bytes
        f.truncate(options.SMALL_MODEL_BYTES)
    assert options.cpu_threads(args(str(small))) == 1
    assert options.cpu_threads(args(str(large))) is None
    assert options.cpu_threads(args(str(large), threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert options.cpu_threads(args(str(small))) is None             # torch already reads it


def test_a_thread_count_below_one_is_refused(capsys):
    assert main(["--prompt", "x", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads 0" in err and "Traceback" not in err


def test_a_serving_engine_leaves_the_machine_to_the_http_process(monkeypatch):
    """serving_threads: --threads (or the small-model rule) when given; torch's own under OMP_NUM_THREADS;
    else 1 on a GPU and all cores but one on the CPU (a pool as wide as the machine stalls when the HTTP
    process takes a core)."""
    import torch
    from dsv3.commands.options import serving_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert serving_threads(torch.device("cuda", 0), None) == 1
    assert serving_threads("npu", None) == 1                          # a device type, as Ascend names it
    assert serving_threads(torch.device("cpu"), None) == 15
    assert serving_threads(torch.device("cpu"), 3) == 3 and serving_threads(torch.device("cuda"), 4) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert serving_threads(torch.device("cpu"), None) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert serving_threads(torch.device("cuda"), None) is None
