"""The `rocm` backend without AMD hardware: exact fn -> fnuz weight conversion, the rocm op table
in Triton's interpreter with e4m3fnuz (gfx942) and e4m3fn (gfx950) against the reference, a tiny
model generating through it, and the plugin's selection rules. Compilation for gfx942 / gfx950 is
in test_triton_compile.py. Nothing here has run on an AMD GPU.
"""
import os

import pytest
import torch

from dsv3.backends.reference import ops as ref
from dsv3.core.quant import FP8_MAX, fp8_fn_to_fnuz, quantize_fp8_block
from dsv3.core.weights import QuantWeight, dequantize


INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter test: run without a GPU or with TRITON_INTERPRET=1 (tests/conftest.py)")


def rocm_ops(arch):
    """The rocm op table for `arch`, kernels interpreted (tests/conftest.py set TRITON_INTERPRET=1)."""
    from dsv3.backends.amd.ops import rocm_ops as build
    return build(arch)


def test_fn_to_fnuz_all_256_patterns():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    w = QuantWeight(bits.view(torch.float8_e4m3fn), torch.tensor([[0.375]]), "fp8-block")
    out = fp8_fn_to_fnuz(w)
    assert out.format == "fp8-fnuz" and out.data.dtype == torch.float8_e4m3fnuz
    assert out.scale.item() == 0.75                                              # doubled
    src, dst = bits.flatten().tolist(), out.data.view(torch.uint8).flatten().tolist()
    for b, o in zip(src, dst):
        if b == 0x80:
            assert o == 0x00                                                     # -0 -> 0 (0x80 is NaN in fnuz)
        elif b & 0x7F == 0x7F:
            assert o == 0x80                                                     # NaN stays NaN
        else:
            assert o == b
    fn_val, fnuz_val = dequantize(w, torch.float64).flatten(), dequantize(out, torch.float64).flatten()
    finite = torch.isfinite(fn_val)
    assert finite.sum() == 254 and torch.isnan(fnuz_val[~finite]).all()
    assert torch.equal(fn_val[finite], fnuz_val[finite])                         # same real values, exactly


@INTERPRETED
@pytest.mark.parametrize("arch,fp8", [("gfx942", torch.float8_e4m3fnuz), ("gfx950", torch.float8_e4m3fn)])
def test_rocm_op_table_in_interpreter(arch, fp8):
    ops = rocm_ops(arch)
    fmt = "fp8-fnuz" if fp8 == torch.float8_e4m3fnuz else "fp8-block"
    w = quantize_fp8_block(torch.randn(136, 256) * 0.05, dtype=fp8)
    assert w.format == fmt
    fmax = FP8_MAX[fp8]
    codes = (torch.randn(3, 256) * fmax / 4).clamp(-fmax, fmax).to(fp8).float()   # exactly quantisable rows
    codes[:, ::128] = fmax
    x = codes * 2.0 ** -6
    y = ops["linear"](x, w)
    assert ((y - ref.linear(x, w)).norm() / ref.linear(x, w).norm()) < 1e-5
    q, s = ops["quantize_act"](x, fp8, False)
    assert q.dtype == fp8 and torch.equal(q.float(), codes) and torch.all(s == 2.0 ** -6)
    xs, r, nw = torch.randn(4, 96), torch.randn(4, 96), 1 + 0.1 * torch.randn(96)
    torch.testing.assert_close(ops["add_rms_norm"](xs, r, nw, 1e-6)[0], ref.add_rms_norm(xs, r, nw, 1e-6)[0],
                               rtol=1e-5, atol=1e-5)


def test_prepare_weights_converts_only_on_mi300(monkeypatch, tmp_path):
    from dsv3.backends.amd import plugin
    from dsv3.core.loader import Checkpoint, load_weights
    from dsv3.core.config import ModelConfig
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    from dsv3.checkpoints.synthetic import TINY_CONFIG, random_checkpoint
    path = random_checkpoint(tmp_path / "tiny", fmt="fp8-block", seed=1)
    for arch, want in (("gfx950", torch.float8_e4m3fn), ("gfx942", torch.float8_e4m3fnuz)):
        monkeypatch.setenv("DSV3_ROCM_ARCH", arch)
        model = DeepseekV3(ModelConfig.from_hf(TINY_CONFIG), Ops.from_mapping(ref.OPS, {}), "fp8-block", torch.float32)
        load_weights(model, Checkpoint(path))
        before = dequantize(model.model.layers[1].mlp.experts.down_proj.qweight)
        plugin.dsv3_prepare_weights(backend="rocm", model=model, profile=None)
        lin = model.model.layers[1].mlp.experts.down_proj
        assert lin.weight.dtype == want and lin.format == ("fp8-fnuz" if arch == "gfx942" else "fp8-block")
        assert torch.equal(dequantize(lin.qweight), before)


@INTERPRETED
def test_tiny_model_generation_through_rocm_ops_in_interpreter(tmp_path, monkeypatch):
    """gfx942: weights converted to fnuz, every op from the rocm table, interpreted on the CPU.
    Same greedy criterion as the cuda test (FP8 activation quantisation vs an unquantised reference)."""
    from dsv3.llm import LLM
    from dsv3.core.cache import LatentCache
    from dsv3.core.config import ModelConfig
    from dsv3.core.engine import Engine
    from dsv3.core.loader import Checkpoint, load_weights
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    from helpers import assert_greedy_matches_reference
    from dsv3.checkpoints.synthetic import TINY_CONFIG, random_checkpoint
    from dsv3.backends.amd.ops import convert_weights_to_fnuz
    path = random_checkpoint(tmp_path / "tiny", fmt="fp8-block", seed=3)
    ops = rocm_ops("gfx942")
    cfg = ModelConfig.from_hf(TINY_CONFIG)
    model = DeepseekV3(cfg, Ops.from_mapping(ops, {n: "rocm" for n in ops}), "fp8-block", torch.float32,
                       with_mtp=False)
    load_weights(model, Checkpoint(path))
    assert convert_weights_to_fnuz(model) > 0
    cache = LatentCache(model.num_cache_layers, 16, 64, cfg.latent_dim, torch.float32, "cpu")
    engine = Engine(model, cache, None, 2048)
    from dsv3.core.sampling import SamplingParams
    prompts = [[5, 17, 99, 3], [200, 201]]
    seqs = [engine.add(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in prompts]
    engine.run_to_completion()
    cpu = LLM(path, backend="cpu", dtype="float32")
    assert_greedy_matches_reference(cpu, prompts, [s.output_ids for s in seqs])


def test_backends_lists_rocm_as_absent_with_how_to_select(capsys):
    from dsv3.commands.main import main
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("rocm:"))
    assert "not a ROCm build" in line and "--backend rocm" in line
