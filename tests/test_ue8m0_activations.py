"""V3.1 (`quantization_config.scale_fmt: ue8m0`): every FP8 GEMM and MoE call quantises its activations
with power-of-two 1x128 scales, on the Triton op table (interpreted on the CPU) and on the reference.

The calls are observed from the test (wrappers around the kernels' Python entry points and launches);
nothing in the product code is instrumented. In-GEMM quantisation (decode-sized M) never shows its
scales, so each such call is re-run with the activation quantised outside by act_quant with ue8m0:
the outputs must agree (the interpreter's fp8 cast is shared by both paths, tests/test_triton_kernels.py).
"""
import importlib
import os

import pytest
import torch

from dsv3.checkpoints.synthetic import TINY_CONFIG, random_weights, to_checkpoint_format, write_checkpoint
from dsv3.core.config import ModelConfig
from dsv3.core.weights import QuantWeight

from helpers import rel_err

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter test: run without a GPU or with TRITON_INTERPRET=1")


def power_of_two(s: torch.Tensor) -> bool:
    return bool(s.numel()) and bool(torch.all(torch.frexp(s.float()).mantissa == 0.5))


def v31_checkpoint(path, seed):
    cfg = dict(TINY_CONFIG, hidden_size=192, moe_intermediate_size=160, intermediate_size=256,   # partial blocks
               num_hidden_layers=2)                                                              # 1 dense + 1 MoE
    weights = random_weights(ModelConfig.from_hf(cfg), seed)
    write_checkpoint(path, cfg, to_checkpoint_format(weights, "fp8-block", torch.float32, ue8m0=True), fmt="fp8-block",
                     ue8m0=True)
    assert ModelConfig.from_file(path / "config.json").act_scale_fmt == "ue8m0"
    return path, cfg


@INTERPRETED
def test_triton_op_table_uses_power_of_two_activation_scales(tmp_path, monkeypatch):
    ops_mod = importlib.import_module("dsv3.backends.triton.ops")
    moe_mod = importlib.import_module("dsv3.backends.triton.moe")
    quant_mod = importlib.import_module("dsv3.backends.triton.quant")
    from dsv3.backends.triton.tuning import QUANT_IN_GEMM_MAX_M, Target
    from dsv3.core.cache import LatentCache
    from dsv3.core.engine import Engine
    from dsv3.core.loader import Checkpoint, load_weights
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    from dsv3.core.sampling import SamplingParams

    seen = {"act_quant": 0, "gemm_outside": 0, "gemm_inside": 0, "moe_launch": 0, "moe_h": 0}
    act_quant, fp8_gemm = quant_mod.act_quant, ops_mod.fp8_gemm

    def spy_act_quant(x, dtype, ue8m0=False, **kw):
        q, s = act_quant(x, dtype, ue8m0, **kw)
        assert ue8m0 and power_of_two(s), "activation quantised without power-of-two scales"
        seen["act_quant"] += 1
        return q, s

    def spy_gemm(a, a_scale, w, w_scale, out_dtype, cfg, ue8m0=False, fp8_max=448.0, **kw):
        y = fp8_gemm(a, a_scale, w, w_scale, out_dtype, cfg, ue8m0=ue8m0, fp8_max=fp8_max, **kw)
        if a_scale is not None:
            assert power_of_two(a_scale)
            seen["gemm_outside"] += 1
        else:   # quantised in the kernel: the same as quantising outside with ue8m0 first
            assert a.shape[0] <= QUANT_IN_GEMM_MAX_M
            xq, xs = act_quant(a, w.dtype, True)
            want = fp8_gemm(xq, xs, w, w_scale, out_dtype, cfg, fp8_max=fp8_max)
            assert rel_err(y, want) < 1e-5, rel_err(y, want)
            seen["gemm_inside"] += 1
        return y

    class SpyLaunch:   # moe_gemm_kernel[grid](...): its gated launch writes the down projection's input scales
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kw):
                out = launch(*args, **kw)
                assert kw["UE8M0"], "MoE GEMM launched without UE8M0"
                seen["moe_launch"] += 1
                if kw["GATED"]:
                    assert power_of_two(args[7]), "MoE hidden requantised without power-of-two scales"
                    seen["moe_h"] += 1
                return out
            return run

    monkeypatch.setattr(ops_mod, "act_quant", spy_act_quant)
    monkeypatch.setattr(moe_mod, "act_quant", spy_act_quant)
    monkeypatch.setattr(ops_mod, "fp8_gemm", spy_gemm)
    monkeypatch.setattr(moe_mod, "moe_gemm_kernel", SpyLaunch(moe_mod.moe_gemm_kernel))

    path, cfg = v31_checkpoint(tmp_path / "v31", seed=int.from_bytes(os.urandom(2), "little"))
    table = ops_mod.make_ops(Target("cuda", torch.float8_e4m3fn, num_sms=8))
    model = DeepseekV3(ModelConfig.from_file(path / "config.json"), Ops.from_mapping(table, {n: "cuda" for n in table}), "fp8-block",
                       torch.float32, with_mtp=False)
    load_weights(model, Checkpoint(path))
    cache = LatentCache(model.num_cache_layers, 8, 64, model.cfg.latent_dim, torch.float32, "cpu")
    engine = Engine(model, cache, None, 2048)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (30, 3)]   # a prefill of 33 rows, then decodes
    for p in prompts:
        engine.add(p, SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.run_to_completion()
    assert all(seen[k] > 0 for k in seen), seen


@INTERPRETED
def test_cublas_dispatch_quantises_with_power_of_two_scales(monkeypatch):
    """NVIDIA's large-M path (torch._scaled_mm) gets ue8m0 scales: _scaled_mm faked by its math on the CPU."""
    from dsv3.backends.nvidia.ops import cublas_linear
    from dsv3.core.quant import quantize_act_fp8, quantize_fp8_block
    seen = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        seen.append(scale_a.clone())
        a_real = a.float() * scale_a.float().repeat_interleave(128, 1)[:, : a.shape[1]]
        b_real = b.float() * scale_b.float().repeat_interleave(128, 0)[: b.shape[0]].repeat_interleave(128, 1)[:, : b.shape[1]]
        return (a_real @ b_real).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    x = torch.randn(40, 512) * 3
    w = quantize_fp8_block(torch.randn(256, 512) * 0.05)
    y = cublas_linear(x, QuantWeight(w.data, w.scale, w.format, "ue8m0"))
    assert power_of_two(seen[-1])
    q, s = quantize_act_fp8(x, ue8m0=True)
    torch.testing.assert_close(seen[-1], s, rtol=0, atol=0)
    assert y.shape == (40, 256)
    cublas_linear(x, w)
    assert not power_of_two(seen[-1])     # and without the format, amax/448 as before


def test_reference_emulates_v31_numerics(tmp_path, monkeypatch):
    """cpu backend with fp8 weights kept: every FP8 linear (experts included) quantises x with ue8m0 scales;
    a profile's `ue8m0: false` switches it off (exact products), which changes the logits."""
    from dsv3 import LLM
    reference = importlib.import_module("dsv3.backends.reference.ops")
    path, cfg = v31_checkpoint(tmp_path / "v31", seed=int.from_bytes(os.urandom(2), "little"))
    scales = []
    quantize = reference.quantize_act_fp8

    def spy(x, group=128, ue8m0=False, dtype=torch.float8_e4m3fn):
        q, s = quantize(x, group, ue8m0, dtype)
        scales.append((ue8m0, s))
        return q, s

    monkeypatch.setattr(reference, "quantize_act_fp8", spy)
    prompts = [torch.randint(2, 500, (n,), generator=torch.Generator().manual_seed(2)).tolist() for n in (9, 4)]
    llm = LLM(path, backend="cpu", dtype="float32", weight_format="fp8-block")
    v31 = llm.logits(prompts)
    # per layer: q_a, q_b, kv_a, kv_b, o, then the dense MLP's 3 or the shared expert's 3 + the routed experts' 3 each
    assert len(scales) >= 8 * cfg["num_hidden_layers"] and all(u and power_of_two(s) for u, s in scales)
    scales.clear()
    plain = LLM(path, backend="cpu", dtype="float32", weight_format="fp8-block", ue8m0=False).logits(prompts)
    assert not scales                                   # exact products: no activation quantisation
    assert rel_err(v31, plain) > 1e-3   # (how much more depends on the tiny random model: 0.02-0.4 seen)
