"""Hostile and broken checkpoint files: each is a clear CheckpointError naming the file (and the tensor,
where there is one); nothing is executed (pickles are never unpickled) and `convert` writes nothing."""
import json
import pickle
import shutil
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import LLM
from dsv3.checkpoints.convert import convert_checkpoint
from dsv3.core.errors import CheckpointError
from dsv3.core.loader import Checkpoint

from helpers import fp8_checkpoint

ST = "model.safetensors"
SENTINEL_NAME = "pwned"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return fp8_checkpoint(tmp_path_factory, "good", seed=11)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return fp8_checkpoint(tmp_path_factory, "sharded", seed=12, num_shards=3)


def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / "in" / name
    shutil.copytree(src, dst)
    return dst


def _split(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header, data, length=None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def _edit_header(path, fn):
    header, data = _split(path)
    fn(header)
    _join(path, header, data)


def _rejected(path, tmp_path, *needles, against_config=False):
    """Opening (unless the fault is only visible against config.json), loading and converting all fail
    with a message holding every needle; convert writes nothing."""
    attempts = [lambda: LLM(path, backend="cpu"),
                lambda: convert_checkpoint(path, tmp_path / "out" / "conv", "bf16", progress=False, log=lambda m: None)]
    for attempt in attempts if against_config else [lambda: Checkpoint(path)] + attempts:
        (tmp_path / "out").mkdir(exist_ok=True)
        with pytest.raises(CheckpointError) as e:
            attempt()
        for needle in needles:
            assert needle in str(e.value), (needle, str(e.value))
        assert list((tmp_path / "out").iterdir()) == []            # convert wrote nothing, not even a temp dir
    return str(e.value)


def test_header_length_larger_than_the_file(good, tmp_path):
    bad = _copy(good, tmp_path)
    header, data = _split(bad / ST)
    _join(bad / ST, header, data, length=10**9)
    _rejected(bad, tmp_path, ST, "header claims 1000000000 bytes")


def test_header_length_shorter_than_the_header(good, tmp_path):
    bad = _copy(good, tmp_path)
    header, data = _split(bad / ST)
    _join(bad / ST, header, data, length=len(json.dumps(header)) // 2)
    _rejected(bad, tmp_path, ST, "not valid JSON")


def test_offsets_outside_the_file(good, tmp_path):
    bad = _copy(good, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"

    def push_out(h):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 10**7, e + 10**7]
    _edit_header(bad / ST, push_out)
    _rejected(bad, tmp_path, ST, name, "truncated")


def test_overlapping_tensors(good, tmp_path):
    bad = _copy(good, tmp_path)
    a, b = "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight"

    def overlap(h):
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + size]     # same bytes as a: reading one corrupts the other
    _edit_header(bad / ST, overlap)
    _rejected(bad, tmp_path, ST, "overlap", a if a < b else b)


def test_gap_between_tensors(good, tmp_path):
    """Moved past 8 unused bytes: in bounds and not overlapping, but safetensors' own parser refuses it."""
    bad = _copy(good, tmp_path)
    name = "model.norm.weight"
    header, data = _split(bad / ST)
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data) + 8, len(data) + 8 + (e - b)]
    _join(bad / ST, header, data + bytes(8 + e - b))
    _rejected(bad, tmp_path, ST, "safetensors rejects this file", "invalid offset for tensor")


def test_byte_count_disagrees_with_dtype_and_shape(good, tmp_path):
    bad = _copy(good, tmp_path)
    name = "model.norm.weight"
    _edit_header(bad / ST, lambda h: h[name].update(shape=[h[name]["shape"][0] * 2]))
    _rejected(bad, tmp_path, ST, name, "data offsets span")


def test_shape_mismatch_with_config(good, tmp_path):
    bad = _copy(good, tmp_path)
    tensors = load_file(bad / ST)
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name][:-16].clone()
    save_file(tensors, bad / ST)
    _rejected(bad, tmp_path, ST, name, "config.json implies", against_config=True)


@pytest.mark.parametrize("name,dtype,needle", [
    ("model.norm.weight", torch.int32, "must be floating point"),
    ("model.layers.1.mlp.experts.2.up_proj.weight", torch.int16, "a projection weight must be"),
    ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", torch.int32, "scales must be floating point"),
])
def test_dtype_mismatch_with_config(good, tmp_path, name, dtype, needle):
    bad = _copy(good, tmp_path)
    tensors = load_file(bad / ST)
    tensors[name] = tensors[name].float().to(dtype)
    save_file(tensors, bad / ST)
    _rejected(bad, tmp_path, ST, name, needle, against_config=True)


def test_fp8_weight_without_its_scale(good, tmp_path):
    bad = _copy(good, tmp_path)
    tensors = load_file(bad / ST)
    del tensors["model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"]
    save_file(tensors, bad / ST)
    _rejected(bad, tmp_path, ST, "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv", "has no",
              against_config=True)


def test_missing_shard_named_by_the_index(sharded, tmp_path):
    bad = _copy(sharded, tmp_path)
    (bad / "model-00002-of-00003.safetensors").unlink()
    _rejected(bad, tmp_path, "model-00002-of-00003.safetensors", "missing", "incomplete")


def test_index_pointing_outside_the_directory(sharded, tmp_path):
    bad = _copy(sharded, tmp_path)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../elsewhere.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    _rejected(bad, tmp_path, "model.safetensors.index.json", name, "outside the model directory")


def test_not_a_safetensors_file(good, tmp_path):
    bad = _copy(good, tmp_path)
    (bad / ST).write_text("<html>404 Not Found</html>" * 10)
    _rejected(bad, tmp_path, ST, "not a safetensors file")
    (bad / ST).write_bytes(b"\x01\x02")
    _rejected(bad, tmp_path, ST, "shorter than its 8-byte header")


class _Payload:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_files_are_never_unpickled(good, tmp_path):
    sentinel = tmp_path / SENTINEL_NAME
    payload = pickle.dumps({"model.norm.weight": _Payload(sentinel)}, protocol=4)
    # 1: a pickle under the safetensors name (raw pickle, then torch.save's zip container)
    bad = _copy(good, tmp_path, "renamed")
    (bad / ST).write_bytes(payload)
    _rejected(bad, tmp_path, ST, "pickle", "never loads pickles")
    with zipfile.ZipFile(bad / ST, "w") as z:
        z.writestr("archive/data.pkl", payload)
    _rejected(bad, tmp_path, ST, "zip archive", "never loads pickles")
    # 2: a directory with only pytorch_model.bin (what old HF checkpoints ship)
    only_bin = _copy(good, tmp_path, "only_bin")
    (only_bin / ST).unlink()
    (only_bin / "pytorch_model.bin").write_bytes(payload)
    _rejected(only_bin, tmp_path, "pytorch_model.bin", "never loads")
    # 3: an index that sends a tensor to a pickle
    idx = _copy(good, tmp_path, "index_to_bin")
    tensors = load_file(idx / ST)
    weight_map = {n: ST for n in tensors}
    weight_map["model.norm.weight"] = "pytorch_model.bin"
    (idx / "pytorch_model.bin").write_bytes(payload)
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _rejected(idx, tmp_path, "pytorch_model.bin", "model.norm.weight", "not a .safetensors file")
    assert not sentinel.exists()
