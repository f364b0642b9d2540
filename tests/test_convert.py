"""`dsv3-run convert` and the quantisation math under it, against float64 references on random data.

Error measures (as convert reports them): max_rel = max|y - x| / max|x|, rms_rel = ||y - x|| / ||x||,
x the float64 dequantised source. Bounds used here are the ones dsv3.checkpoints.convert.BOUNDS states.
Logits of converted checkpoints are compared with the source's as max|a - b| / max|b|:
fp8-block / fp8-fnuz (exact conversions) <= 1e-5, bf16 <= 3e-2, int8-w8a8 <= 8e-2 (measured over seeds:
~0.01 and ~0.03). FP8 from BF16 quantises every projection to 4 significant bits and the error grows
over the layers: RMS ||a - b|| / ||b|| <= 0.2 (measured 0.09-0.15). The model routes every token to all experts (top-k = E):
with a random router, a rounding-sized change flips top-k choices and moves logits by O(1), which
would test chaos, not conversion.
"""
import json
import random

import pytest
import torch

import dsv3.checkpoints.convert as convert_mod
import dsv3.core.loader as loader_mod
from dsv3 import LLM
from dsv3.commands.main import main
from dsv3.checkpoints.convert import BOUNDS, ConversionError, convert_checkpoint, parse_size
from dsv3.core.loader import Checkpoint, RawWeight, convert_into, convert_weight
from dsv3.core.quant import fp8_fn_to_fnuz, quantize_fp8_block, quantize_int8_channel
from dsv3.core.weights import QuantWeight, dequantize, expand_block_scale

from helpers import make_checkpoint, random_prompts, rel_err, tiny_config

SMOOTH = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=8)   # every expert active: see above
FORMATS = ("bf16", "fp8-block", "fp8-fnuz", "int8-w8a8")
LOGIT_BOUND = {"bf16": 3e-2, "fp8-block": 1e-5, "fp8-fnuz": 1e-5, "int8-w8a8": 8e-2}


def _weight(rows, cols, seed, outliers=True):
    """Random weights, never zeros: gaussian with a few large outliers and tiny values (subnormal in fp8)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    if outliers:
        idx = torch.randint(0, rows * cols, (max(1, rows * cols // 500),), generator=g)
        w.view(-1)[idx] *= 40
        w.view(-1)[idx[: len(idx) // 2]] *= 1e-5
    return w


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A tiny official-layout FP8 checkpoint (bf16 norms and embeddings), 3 shards, tokenizer, MTP layer."""
    path, _ = make_checkpoint(tmp_path_factory.mktemp("src") / "fp8", SMOOTH, seed=random.randrange(2**31),
                              fmt="fp8-block", num_shards=3, dtype=torch.bfloat16)
    return path


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(tiny_config()["vocab_size"], [13, 6], random.randrange(2**31))


# -- the math -------------------------------------------------------------------------------------

def test_e4m3fn_to_e4m3fnuz_is_exact_on_all_256_bit_patterns():
    bits = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(1, 256)
    scale = torch.tensor([[0.37, 1.9]], dtype=torch.float32)           # two column blocks
    fn = QuantWeight(bits.view(torch.float8_e4m3fn), scale, "fp8-block")
    fnuz = fp8_fn_to_fnuz(fn)
    assert fnuz.data.dtype == torch.float8_e4m3fnuz and torch.equal(fnuz.scale, scale * 2)
    a, b = dequantize(fn, torch.float64), dequantize(fnuz, torch.float64)
    nan = bits.view(-1).bitwise_and(0x7F) == 0x7F                       # fn NaN: 0x7F, 0xFF
    assert torch.isnan(b.view(-1)[nan]).all()
    assert torch.equal(a.view(-1)[~nan], b.view(-1)[~nan])               # -0 (0x80) -> +0 compares equal
    assert fnuz.data.view(torch.uint8)[0, 0x80] == 0                     # 0x80 is NaN in fnuz: mapped to 0


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_block_quantisation_against_float64(ue8m0):
    w = _weight(576, 200, seed=random.randrange(2**31))                 # 5 x 2 blocks, partial edges
    q = quantize_fp8_block(w.float(), ue8m0=ue8m0)
    assert q.scale.shape == (5, 2)
    amax = torch.nn.functional.pad(w.abs(), (0, 56, 0, 64)).view(5, 128, 2, 128).amax(dim=(1, 3))
    if ue8m0:   # powers of two, the smallest that keeps the block within +-448
        assert torch.equal(torch.log2(q.scale.double()), torch.log2(q.scale.double()).round())
        assert (q.scale.double() >= amax / 448 * (1 - 1e-6)).all() and (q.scale.double() < 2 * amax / 448).all()
    else:
        torch.testing.assert_close(q.scale.double(), amax / 448, rtol=1e-6, atol=0)
    err = (dequantize(q, torch.float64) - w).abs()
    block_amax = expand_block_scale(amax, 576, 200)
    assert (err <= block_amax / 16).all()                                # bound stated in convert.BOUNDS
    scaled = w.abs() / expand_block_scale(q.scale.double(), 576, 200)
    normal = scaled >= 2**-6                                             # e4m3 normal range: 4 significant bits
    assert (err[normal] <= 2**-4 * w.abs()[normal] * (1 + 1e-6)).all()
    assert float(err.max() / w.abs().max()) <= BOUNDS["fp8"][0]


def test_int8_per_channel_error_bound():
    w = _weight(300, 520, seed=random.randrange(2**31))
    q = quantize_int8_channel(w.float())
    rowmax = w.abs().amax(dim=1)
    torch.testing.assert_close(q.scale.double(), rowmax / 127, rtol=1e-6, atol=0)
    err = (dequantize(q, torch.float64) - w).abs()
    assert (err <= (rowmax / 254 * (1 + 1e-5)).unsqueeze(1)).all()
    assert q.data.abs().max() <= 127


@pytest.mark.parametrize("src_fmt", ["dense", "fp8-block", "int8-w8a8"])
@pytest.mark.parametrize("dst_fmt", ["dense", "fp8-block", "fp8-fnuz", "int8-w8a8"])
def test_chunked_conversion_is_bit_identical(monkeypatch, src_fmt, dst_fmt):
    """convert_into works in 128-row chunks; the result must equal converting the tensor at once."""
    w = _weight(700, 264, seed=random.randrange(2**31)).float()
    src = convert_weight(QuantWeight(w, None, "dense"), src_fmt, torch.float32)
    whole = convert_weight(src, dst_fmt, torch.bfloat16, ue8m0=True)
    monkeypatch.setattr(loader_mod, "chunk_rows", lambda *a, **k: 128)
    data = torch.empty_like(whole.data)
    scale = None if whole.scale is None else torch.empty_like(whole.scale)
    convert_into(RawWeight(src.data, src.scale, None, src_fmt), dst_fmt, torch.bfloat16, True, data, scale)
    assert torch.equal(data.view(torch.uint8) if data.element_size() == 1 else data, whole.data.view(torch.uint8)
                       if data.element_size() == 1 else whole.data)
    if scale is not None:
        assert torch.equal(scale, whole.scale)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("1500000") == 1500000
    with pytest.raises(ConversionError, match="max-shard-size"):
        parse_size("lots")


# -- whole checkpoints ------------------------------------------------------------------------------

def _tensors(path):
    ckpt = Checkpoint(path)
    out = {n: ckpt.read(n).clone() for n in ckpt.names()}
    ckpt.close()
    return out


@pytest.mark.parametrize("to", FORMATS)
def test_convert_each_format_loads_and_matches_source(fp8_ckpt, prompts, tmp_path, to):
    dst = tmp_path / to
    report = convert_checkpoint(fp8_ckpt, dst, to, max_shard_bytes=300_000, progress=False, log=lambda m: None)
    assert report.shards_written >= 2 and not (tmp_path / f".{to}.partial").exists()
    files = sorted(p.name for p in dst.iterdir())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(f for f in files if f.endswith(".safetensors")) and len(shards) == report.shards_written
    n = tiny_config()["num_hidden_layers"]
    assert f"model.layers.{n}.eh_proj.weight" in index["weight_map"]                       # MTP kept
    assert f"model.layers.{n}.mlp.experts.0.up_proj.weight" in index["weight_map"]
    config = json.loads((dst / "config.json").read_text())
    quant = config.get("quantization_config")
    tensors = _tensors(dst)
    w = tensors["model.layers.1.self_attn.q_b_proj.weight"]
    if to == "bf16":
        assert quant is None and w.dtype == torch.bfloat16
    elif to in ("fp8-block", "fp8-fnuz"):
        assert quant == {"quant_method": "fp8", "fmt": "e4m3" if to == "fp8-block" else "e4m3fnuz",
                         "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        assert w.dtype == (torch.float8_e4m3fn if to == "fp8-block" else torch.float8_e4m3fnuz)
    else:
        assert quant is None and config["quantize"] == "w8a8_dynamic" and w.dtype == torch.int8
        scale = tensors["model.layers.1.self_attn.q_b_proj.weight_scale"]
        assert scale.shape == (w.shape[0], 1) and scale.dtype == torch.float32
        assert not tensors["model.layers.1.self_attn.q_b_proj.weight_offset"].any()
        desc = json.loads((dst / "quant_model_description.json").read_text())
        assert desc["model_quant_type"] == "W8A8_DYNAMIC"
        assert set(desc) - {"model_quant_type"} == set(tensors)
        assert desc["model.layers.1.self_attn.q_b_proj.weight_offset"] == "W8A8_DYNAMIC"
        assert desc[f"model.layers.{n}.mlp.experts.3.down_proj.weight"] == "W8A8_DYNAMIC"
        assert desc["model.embed_tokens.weight"] == "FLOAT" and desc["lm_head.weight"] == "FLOAT"
    assert tensors["lm_head.weight"].dtype == torch.bfloat16                                 # heads stay dense
    for cls, s in report.stats.items():
        assert s.max_rel <= s.bound[0] and s.rms_rel <= s.bound[1], cls

    ref = LLM(fp8_ckpt, backend="cpu").logits(prompts)
    llm = LLM(dst, backend="cpu", weight_format="auto")
    assert llm.weight_format == {"bf16": "dense"}.get(to, to)
    assert llm.model.has_mtp
    assert rel_err(llm.logits(prompts), ref) <= LOGIT_BOUND[to]
    ref_mtp = LLM(fp8_ckpt, backend="cpu").mtp_logits(prompts)
    assert rel_err(llm.mtp_logits(prompts), ref_mtp) <= LOGIT_BOUND[to]


def test_round_trip_fp8_bf16_fp8_and_ue8m0(fp8_ckpt, tmp_path):
    convert_checkpoint(fp8_ckpt, tmp_path / "bf16", "bf16", progress=False, log=lambda m: None)
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8-block", progress=False, log=lambda m: None)
    report = convert_checkpoint(tmp_path / "bf16", tmp_path / "ue8m0", "fp8-block", ue8m0=True, progress=False,
                                log=lambda m: None)
    assert report.stats["layers.self_attn.o_proj"].max_rel > 0                              # really requantised
    a, b, c = _tensors(fp8_ckpt), _tensors(tmp_path / "fp8"), _tensors(tmp_path / "ue8m0")
    assert json.loads((tmp_path / "ue8m0" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    for name in a:
        if not name.endswith(".weight_scale_inv"):
            continue
        w = name[: -len("_scale_inv")]
        orig = dequantize(QuantWeight(a[w], a[name], "fp8-block"), torch.float64)
        back = dequantize(QuantWeight(b[w], b[name], "fp8-block"), torch.float64)
        assert float((back - orig).abs().max() / orig.abs().max()) <= BOUNDS["fp8"][0], name
        assert float((back - orig).norm() / orig.norm()) <= BOUNDS["fp8"][1], name
        s = c[name].double()
        assert torch.equal(torch.log2(s), torch.log2(s).round()), name                      # powers of two


def test_dense_to_fp8_checkpoint_logits(tmp_path, prompts):
    src, _ = make_checkpoint(tmp_path / "bf16", SMOOTH, seed=random.randrange(2**31), dtype=torch.bfloat16)
    report = convert_checkpoint(src, tmp_path / "fp8", "fp8-block", progress=False, log=lambda m: None)
    assert 0 < report.stats["layers.mlp.experts.gate_proj"].max_rel <= BOUNDS["fp8"][0]
    ref = LLM(src, backend="cpu").logits(prompts)
    out = LLM(tmp_path / "fp8", backend="cpu", weight_format="auto").logits(prompts)
    assert float((out - ref).norm() / ref.norm()) <= 0.2


def test_refuses_to_overwrite_and_overwrites_when_asked(fp8_ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert_checkpoint(fp8_ckpt, dst, "bf16", progress=False, log=lambda m: None)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and not (tmp_path / ".out.partial").exists()
    convert_checkpoint(fp8_ckpt, dst, "bf16", overwrite=True, progress=False, log=lambda m: None)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ConversionError, match="outside the source"):
        convert_checkpoint(fp8_ckpt, fp8_ckpt / "inner", "bf16", progress=False, log=lambda m: None)


def test_interrupted_run_resumes_and_matches_a_clean_run(fp8_ckpt, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    convert_checkpoint(fp8_ckpt, clean, "int8-w8a8", max_shard_bytes=200_000, progress=False, log=lambda m: None)
    real = convert_mod._convert_job
    calls = {"n": 0}

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "_convert_job", dies_midway)
    dst, part = tmp_path / "out", tmp_path / ".out.partial"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(fp8_ckpt, dst, "int8-w8a8", max_shard_bytes=200_000, progress=False, log=lambda m: None)
    assert not dst.exists() and part.is_dir()                 # nothing that looks complete
    assert any(p.name.endswith(".incomplete") for p in part.iterdir())
    monkeypatch.setattr(convert_mod, "_convert_job", real)
    logs = []
    report = convert_checkpoint(fp8_ckpt, dst, "int8-w8a8", max_shard_bytes=200_000, progress=False, log=logs.append)
    assert report.shards_resumed >= 1 and report.shards_written >= 1 and "resuming" in logs[0]
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in clean.iterdir())
    for f in clean.iterdir():
        assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
    assert sum(s.tensors for s in report.stats.values()) == sum(1 for _ in Checkpoint(fp8_ckpt).names()
                                                                   if not _.endswith("scale_inv"))

    # an interrupted run of a different command is discarded, not mixed in
    monkeypatch.setattr(convert_mod, "_convert_job", dies_midway)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(fp8_ckpt, tmp_path / "x", "bf16", max_shard_bytes=200_000, progress=False, log=lambda m: None)
    monkeypatch.setattr(convert_mod, "_convert_job", real)
    logs = []
    convert_checkpoint(fp8_ckpt, tmp_path / "x", "fp8-fnuz", max_shard_bytes=200_000, progress=False, log=logs.append)
    assert "starting over" in logs[0]
    assert json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3fnuz"


def test_verification_failure_stops_and_leaves_nothing(fp8_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(BOUNDS, "int8", (1e-9, 1e-9))
    with pytest.raises(ConversionError, match=r"self_attn\.q_a_proj\.weight|experts|proj\.weight"):
        convert_checkpoint(fp8_ckpt, tmp_path / "out", "int8-w8a8", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert(fp8_ckpt, tmp_path, capsys):
    dst = tmp_path / "w8a8"
    assert main(["convert", str(fp8_ckpt), str(dst), "--to", "int8-w8a8", "--max-shard-size", "2MB"]) == 0
    out = capsys.readouterr().out
    assert "layers.mlp.experts.up_proj" in out and "wrote" in out and (dst / "config.json").is_file()
    assert main(["convert", str(fp8_ckpt), str(dst), "--to", "bf16"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(fp8_ckpt), str(tmp_path / "y"), "--to", "bf16", "--ue8m0"]) == 2
    assert "--ue8m0 applies to --to fp8-block" in capsys.readouterr().err
