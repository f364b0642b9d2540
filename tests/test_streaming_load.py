"""Streaming load: shards in order, one mapped at a time, one tensor (plus its scale) live; per-rank
slicing reads only the bytes a rank keeps; byte progress; ModelSlim W8A8 checkpoints load.

Memory is checked by instrumenting Checkpoint.read (what is alive and mapped at each read), not by timing.
"""
import io
import json
import random
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import LLM
from dsv3.backends.reference.ops import OPS
from dsv3.core.config import ModelConfig
from dsv3.core.errors import CheckpointError
from dsv3.core.loader import (Checkpoint, Progress, checkpoint_format, load_weights, read_weight, weight_source)
from dsv3.core.model import DeepseekV3, Experts, Linear
from dsv3.core.ops import Ops
from dsv3.core.quant import quantize_fp8_block, quantize_int8_channel
from dsv3.core.weights import QuantWeight, dequantize

from helpers import make_checkpoint, random_prompts, rel_err, tiny_config

CFG = tiny_config()


@pytest.fixture(scope="module")
def fp8_sharded(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("s") / "fp8", CFG, seed=random.randrange(2**31),
                              fmt="fp8-block", num_shards=4, dtype=torch.bfloat16, tokenizer=False)
    return path


def _model(fmt="dense", dtype=torch.float32):
    return DeepseekV3(ModelConfig.from_hf(CFG), Ops.from_mapping(OPS, {}), fmt, dtype)


def test_streams_shards_in_order_one_tensor_live(fp8_sharded, monkeypatch):
    ckpt = Checkpoint(fp8_sharded)
    live, seen = weakref.WeakSet(), {"max_live": 0, "max_open": 0, "main_shards": []}
    real_read = Checkpoint.read

    def instrumented(self, name, slices=None):
        seen["max_live"] = max(seen["max_live"], len(live))       # tensors from earlier reads still alive
        seen["max_open"] = max(seen["max_open"], len(self.open_shards()))
        if not name.endswith(("_scale_inv", "_scale", "_offset")):
            seen["main_shards"].append(self.shards.index(self.file_of[name]))
        t = real_read(self, name, slices)
        live.add(t)
        return t

    monkeypatch.setattr(Checkpoint, "read", instrumented)
    model = _model()
    load_weights(model, ckpt, progress=False)
    assert seen["max_live"] <= 1                 # at a read, at most the weight of the same projection is alive
    assert seen["max_open"] <= 1                 # the previous shard is unmapped before the next one is opened
    assert seen["main_shards"] == sorted(seen["main_shards"]) and len(set(seen["main_shards"])) == 4
    assert ckpt.open_shards() == []
    assert ckpt.bytes_read == sum(ckpt.nbytes(n) for n in ckpt.names())   # every byte read exactly once

    ref = load_file(fp8_sharded / "model-00002-of-00004.safetensors")
    ref.update(load_file(fp8_sharded / "model-00003-of-00004.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}_scale_inv" in ref:
            want = dequantize(QuantWeight(ref[name], ref[f"{name}_scale_inv"], "fp8-block"), torch.float64)
            torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=0)
        elif name in ref:
            assert torch.equal(p, ref[name].float())


def test_expert_parallel_rank_reads_only_its_experts(fp8_sharded):
    model = _model("fp8-block")
    for m in model.modules():
        if isinstance(m, Experts):              # what rank 1 of 2 holds: experts 4..7
            m.first_expert = 4
            for proj in ("gate_proj", "up_proj", "down_proj"):
                old = getattr(m, proj)
                setattr(m, proj, Linear(model.ops, old.weight.shape[2], old.weight.shape[1], "fp8-block",
                                        torch.float32, experts=4))
    ckpt = Checkpoint(fp8_sharded)
    load_weights(model, ckpt, progress=False)
    others = [n for n in ckpt.names() if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) < 4]
    assert others and ckpt.bytes_read == sum(ckpt.nbytes(n) for n in ckpt.names() if n not in others)
    tensors = {}
    for f in ckpt.shards:
        tensors.update(load_file(f))
    w = model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(w.weight[2].view(torch.uint8),
                       tensors["model.layers.1.mlp.experts.6.down_proj.weight"].view(torch.uint8))
    assert torch.equal(w.weight_scale_inv[0], tensors["model.layers.1.mlp.experts.4.down_proj.weight_scale_inv"])


def test_tensor_parallel_slicer_reads_only_the_kept_bytes(tmp_path):
    path, _ = make_checkpoint(tmp_path / "bf16", CFG, seed=random.randrange(2**31), dtype=torch.bfloat16,
                              tokenizer=False)
    full = _model()
    load_weights(full, Checkpoint(path), progress=False)
    vocab, d = CFG["vocab_size"], CFG["hidden_size"]
    rank = _model()
    rank.lm_head = Linear(rank.ops, d, vocab // 2, "dense", torch.float32)       # column parallel: rows 256..511
    attn = rank.model.layers[0].self_attn
    attn.o_proj = Linear(rank.ops, attn.o_proj.weight.shape[1] // 2, d, "dense", torch.float32)   # row parallel

    def slicer(name, shape):
        if name == "lm_head.weight":
            return (slice(shape[0] // 2, shape[0]),)
        if name == "model.layers.0.self_attn.o_proj.weight":
            return (slice(None), slice(0, shape[1] // 2))
        return None

    ckpt = Checkpoint(path)
    load_weights(rank, ckpt, progress=False, slicer=slicer)
    assert torch.equal(rank.lm_head.weight, full.lm_head.weight[vocab // 2:])
    half = attn.o_proj.weight.shape[1]
    assert torch.equal(attn.o_proj.weight, full.model.layers[0].self_attn.o_proj.weight[:, :half])
    saved = ckpt.nbytes("lm_head.weight") // 2 + ckpt.nbytes("model.layers.0.self_attn.o_proj.weight") // 2
    assert ckpt.bytes_read == sum(ckpt.nbytes(n) for n in ckpt.names()) - saved
    with pytest.raises(CheckpointError, match="lm_head.weight"):      # a slice that does not fit the parameter
        load_weights(rank, Checkpoint(path), progress=False,
                     slicer=lambda n, s: (slice(0, 10),) if n == "lm_head.weight" else slicer(n, s))


def test_fp8_slices_follow_the_scale_blocks(tmp_path):
    w = torch.randn(384, 256, dtype=torch.float64) * 0.02
    q = quantize_fp8_block(w.float())
    (tmp_path / "config.json").write_text("{}")
    save_file({"x.weight": q.data, "x.weight_scale_inv": q.scale}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    src = weight_source(ckpt, "x", 384, 256)
    raw = read_weight(ckpt, src, (slice(128, 384), slice(128, 256)))
    assert raw.scale.shape == (2, 1)
    got = dequantize(QuantWeight(raw.data, raw.scale, "fp8-block"), torch.float64)
    assert torch.equal(got, dequantize(q, torch.float64)[128:, 128:])
    with pytest.raises(CheckpointError, match="128x128"):
        read_weight(ckpt, src, (slice(64, 192),))


def test_progress_is_quiet_off_a_terminal_and_shows_rate_and_eta_on_one(fp8_sharded, capsys):
    load_weights(_model(), Checkpoint(fp8_sharded))            # stderr is captured: not a TTY
    assert capsys.readouterr().err == ""
    stream = io.StringIO()
    p = Progress(3 * 10**9, "loading", enabled=True, shards=2, stream=stream)
    p.shard(1)
    p.update(10**9)
    p.close()
    line = stream.getvalue().strip().splitlines()[-1]
    assert "loading" in line and "/3.00 GB" in line and "GB/s" in line and "ETA" in line and "shard 1/2" in line
    quiet = io.StringIO()
    Progress(10, "loading", stream=quiet).update(10)            # a StringIO is not a terminal
    assert quiet.getvalue() == ""


def _modelslim(tmp_path, src, mutate=None):
    """The ModelSlim W8A8_DYNAMIC layout, written by hand the way Ascend peers ship it."""
    dense = {}
    ckpt = Checkpoint(src)
    for n in ckpt.names():
        dense[n] = ckpt.read(n).clone()
    out, desc, reals = {}, {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0"}, {}
    quantized = [n[: -len("_scale_inv")] for n in dense if n.endswith("weight_scale_inv")]
    for n, t in dense.items():
        if n.endswith("weight_scale_inv"):
            continue
        if n in quantized:
            real = dequantize(QuantWeight(t, dense[n + "_scale_inv"], "fp8-block"), torch.float32)
            q = quantize_int8_channel(real)
            pre = n[: -len(".weight")]
            flat = len(out) % 2 == 0                     # both scale shapes occur: [out] and [out, 1]
            out[n] = q.data
            out[f"{pre}.weight_scale"] = q.scale if flat else q.scale.view(-1, 1)
            out[f"{pre}.weight_offset"] = torch.zeros_like(out[f"{pre}.weight_scale"])
            reals[n] = q
            for k in (n, f"{pre}.weight_scale", f"{pre}.weight_offset"):
                desc[k] = "W8A8_DYNAMIC"
        else:
            out[n] = t
            desc[n] = "FLOAT"
    if mutate:
        mutate(out, desc)
    dst = tmp_path / "w8a8"
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps({**CFG, "quantize": "w8a8_dynamic"}))
    (dst / "quant_model_description.json").write_text(json.dumps(desc))
    save_file(out, dst / "model.safetensors")
    return dst, reals


def test_modelslim_w8a8_layout_loads(fp8_sharded, tmp_path):
    asym = "model.layers.2.mlp.experts.5.gate_proj"
    expected = {}

    def asymmetric(out, desc):   # one asymmetric weight: real = (q - offset) * scale
        scale = out[f"{asym}.weight_scale"].flatten()
        offset = torch.randint(-3, 4, scale.shape).float()
        q = out[f"{asym}.weight"].float() + offset.unsqueeze(1)
        out[f"{asym}.weight"] = q.clamp(-128, 127).to(torch.int8)
        out[f"{asym}.weight_offset"] = offset.view(out[f"{asym}.weight_scale"].shape)
        expected["asym"] = (out[f"{asym}.weight"].double() - offset.double().unsqueeze(1)) * scale.double().unsqueeze(1)

    path, reals = _modelslim(tmp_path, fp8_sharded, asymmetric)
    assert checkpoint_format(Checkpoint(path)) == "int8-w8a8"
    llm = LLM(path, backend="cpu", weight_format="auto")
    assert llm.weight_format == "int8-w8a8"
    proj = llm.model.model.layers[1].self_attn.q_b_proj
    want = reals["model.layers.1.self_attn.q_b_proj.weight"]
    assert proj.weight.dtype == torch.int8 and torch.equal(proj.weight, want.data)
    assert proj.weight_scale.shape == want.scale.shape and torch.equal(proj.weight_scale, want.scale)
    dense = LLM(path, backend="cpu", weight_format="dense")
    experts = dense.model.model.layers[2].mlp.experts.gate_proj.weight[5]
    torch.testing.assert_close(experts.double(), expected["asym"], rtol=1e-6, atol=0)
    prompts = random_prompts(CFG["vocab_size"], [9], random.randrange(2**31))
    assert rel_err(llm.logits(prompts), dense.logits(prompts)) < 0.2   # the asymmetric weight is requantised


def test_modelslim_layouts_dsv3_does_not_run(fp8_sharded, tmp_path):
    name = "model.layers.0.self_attn.o_proj"

    def static(out, desc):       # static W8A8: deq_scale / input_scale instead of weight_scale
        out[f"{name}.deq_scale"] = out.pop(f"{name}.weight_scale").flatten()
        out[f"{name}.input_scale"] = torch.ones(1)
        del out[f"{name}.weight_offset"]
    (tmp_path / "a").mkdir()
    path, _ = _modelslim(tmp_path / "a", fp8_sharded, static)
    with pytest.raises(CheckpointError, match="static W8A8.*W8A8_DYNAMIC"):
        LLM(path, backend="cpu")

    def w4(out, desc):
        desc[f"{name}.weight"] = "W4A8_DYNAMIC"
    (tmp_path / "b").mkdir()
    path, _ = _modelslim(tmp_path / "b", fp8_sharded, w4)
    with pytest.raises(CheckpointError, match=f"{name}.weight.*W4A8_DYNAMIC"):
        LLM(path, backend="cpu")
