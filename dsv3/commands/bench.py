"""`dsv3-run bench`: how close the GPU backend runs to what the hardware allows.

The ceilings are measured in the same run, each the way the work it bounds uses the GPU: streaming
read bandwidth (a 4 GiB reduction timed with CUDA events) is the floor of every byte-bound op and
decode step; FP8 and BF16 cuBLAS at 8192^3 are the FLOP ceilings; a device copy is reported as
information only (timed as a CUDA graph of copies it shows ~2.75 of ~4.3 TB/s on an H200).

(a) op level, at DeepSeek-V3 shapes: each op's time, achieved TFLOP/s or GB/s, its floor (bytes over
    the read bandwidth, FLOPs over the FP8 / BF16 peak; the larger), the ratio time / floor, and the
    library baseline beside it (cuBLAS block-scaled torch._scaled_mm for the FP8 GEMMs, torch for the
    rest). GEMMs show the op as dispatched and the Triton kernel alone.
(b) end to end at the model's real depth (`--depth`, default the config's 61 layers, 3 dense + 58
    MoE): full width, random FP8 weights made on the GPU (no files). One GPU cannot hold 61 layers,
    so a few layers' storage is shared across depth; each layer's working set is far above L2, so
    every layer still reads its weights from memory and per-layer costs show as in production.
    Decode at batch 1/8/64/256 (CUDA graphs) and contexts 1024/4096, prefill 1x4096 and 4x2048:
    ms, tok/s, GB read, floor, x floor; then where decode kernel time goes (torch.profiler).

Small ops are timed as CUDA-graph replays of many calls (decode runs them that way); weight-streaming
ops rotate over enough weight copies to defeat L2.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

# The official DeepSeek-V3 config.json (../shared/reference/deepseek-v3/config.json), model fields only.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
# (name, N, K) of every FP8 GEMM in a DeepSeek-V3 layer
GEMM_SHAPES = [("q_a", 1536, 7168), ("q_b", 24576, 1536), ("kv_a", 576, 7168), ("kv_b", 32768, 512),
               ("o_proj", 7168, 16384), ("dense gate/up", 18432, 7168), ("dense down", 7168, 18432),
               ("shared gate/up", 2048, 7168), ("shared down", 7168, 2048)]
L2_DEFEAT_BYTES = 256 << 20
STORED_MOE_LAYERS = 2   # MoE layers with their own storage in the depth-shared model (dense: 1)
GPU_BACKENDS = ("cuda", "rocm")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark ops at DeepSeek-V3 shapes and end-to-end decode/prefill",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", help="cuda (default) or rocm: bench measures a GPU backend")
    p.add_argument("--part", choices=("ops", "e2e", "all"), default="all")
    p.add_argument("--depth", type=int, default=DEEPSEEK_V3["num_hidden_layers"],
                   help="decoder layers of the end-to-end model (default 61, the config's; the first "
                        f"min({DEEPSEEK_V3['first_k_dense_replace']}, depth - 1) dense); storage shared across depth")
    p.add_argument("--contexts", default="1024,4096", help="cached tokens per sequence in the decode rows")
    p.add_argument("--batches", default="1,8,64,256", help="decode batch sizes")
    p.add_argument("--prefill", default="1x4096,4x2048", help="prefill batches: SEQUENCESxTOKENS, comma-separated")
    p.add_argument("--gemm-m", default="1,16,64,512,4096,8192", help="M values of the GEMM table")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op-class profile of the decode rows")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    p.set_defaults(func=run)


def check_backend(registry, name: str):
    """The backend spec `bench` will measure, or a Dsv3Error before anything is built or timed."""
    from dsv3.core.errors import Dsv3Error
    spec = registry.backend(name)             # an unknown name: a PluginError listing the known ones
    if spec.name not in GPU_BACKENDS:
        raise Dsv3Error(f"dsv3-run bench measures a GPU backend against the GPU's own ceilings; "
                        f"{name!r} is the {spec.name!r} backend. Use --backend cuda (NVIDIA) or rocm (AMD); "
                        f"for correctness on any backend run dsv3-run check --backend {spec.name}")
    return spec


# ---------------------------------------------------------------------------------------------- timing
def _events():
    import torch
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_calls(fns, calls: int = 20, reps: int = 10, graph: bool = True) -> tuple[float, str]:
    """Median seconds per call of round-robin `fns`: CUDA-graph replays of `calls` calls, else events."""
    import torch
    for f in fns:
        f()
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(calls):
                    fns[i % len(fns)]()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                for i in range(calls):
                    fns[i % len(fns)]()
            g.replay()
            torch.cuda.synchronize()
            samples = []
            for _ in range(reps):
                a, b = _events()
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                samples.append(a.elapsed_time(b) / 1e3 / calls)
            return statistics.median(samples), "graph"
        except Exception:  # noqa: BLE001 - ops that synchronise with the host cannot be captured
            torch.cuda.synchronize()
    samples = []
    for r in range(max(reps, 5)):
        a, b = _events()
        a.record()
        for i in range(len(fns)):
            fns[i]()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / 1e3 / len(fns))
    return statistics.median(samples), "events"


@dataclass(frozen=True)
class Ceilings:
    read: float     # streaming read, bytes/s: the floor of byte-bound ops and decode steps
    copy: float     # device copy, bytes/s counting read + write (information)
    fp8: float      # FP8 cuBLAS FLOP/s at 8192^3
    bf16: float     # BF16 cuBLAS FLOP/s at 8192^3

    def line(self) -> str:
        return (f"measured ceilings: streaming read {self.read / 1e12:.2f} TB/s (4 GiB x.sum(), CUDA events; the "
                f"byte floor), copy {self.copy / 1e12:.2f} TB/s (read + write, events; information), FP8 cuBLAS "
                f"{self.fp8 / 1e12:.0f} TFLOP/s, BF16 cuBLAS {self.bf16 / 1e12:.0f} TFLOP/s (8192^3)")


def time_events(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of one `fn()`, each call between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        a, b = _events()
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / 1e3)
    return statistics.median(samples)


def measure_ceilings() -> Ceilings:
    import torch
    x = torch.empty(1 << 30, device="cuda").normal_()       # 4 GiB of float32, ~70x the L2
    read = x.numel() * 4 / time_events(lambda: x.sum())
    del x
    src = torch.empty(1 << 28, device="cuda").normal_()     # 1 GiB
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / time_events(lambda: dst.copy_(src))
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    t8 = time_events(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    ah, bh = a.to(torch.bfloat16), b.to(torch.bfloat16)
    t16 = time_events(lambda: ah @ bh.t())
    return Ceilings(read, copy, 2 * m ** 3 / t8, 2 * m ** 3 / t16)


# ------------------------------------------------------------------------------------------ op table
class Table:
    def __init__(self, title: str, columns: list[str]):
        self.title, self.columns, self.rows = title, columns, []

    def add(self, *cells):
        self.rows.append([c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells])
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def _us(t):
    return f"{t * 1e6:.1f}"


def _random_fp8_weight(n, k, device, copies=1):
    import torch
    from dsv3.core.weights import QuantWeight
    out = []
    for _ in range(copies):
        data = (torch.randn(n, k, device=device, dtype=torch.bfloat16) * 64).to(torch.float8_e4m3fn)
        scale = (0.02 / 64) * (1 + 0.1 * torch.rand(-(-n // 128), -(-k // 128), device=device))
        out.append(QuantWeight(data, scale, "fp8-block"))
    return out


def _random_fp8_experts(num_experts, hidden, inter, device):
    """ExpertWeights of `num_experts` random FP8 experts (gate, up [inter, hidden]; down [hidden, inter]),
    filled 32 experts at a time (bounding the bf16 temporary: 7.5 GB for all 256 gate matrices at once)."""
    import torch
    from dsv3.core.ops import ExpertWeights
    from dsv3.core.weights import QuantWeight
    stacks = []
    for n, k in ((inter, hidden), (inter, hidden), (hidden, inter)):
        data = torch.empty(num_experts, n, k, dtype=torch.float8_e4m3fn, device=device)
        for e0 in range(0, num_experts, 32):
            e1 = min(e0 + 32, num_experts)
            data[e0:e1] = (torch.randn(e1 - e0, n, k, device=device, dtype=torch.bfloat16) * 64).to(torch.float8_e4m3fn)
        stacks.append(QuantWeight(data, (0.02 / 64) * torch.ones(num_experts, -(-n // 128), -(-k // 128),
                                                                  device=device), "fp8-block"))
    return ExpertWeights(*stacks)


def gemm_table(ops, target, ceil, m_values) -> Table:
    import torch
    from dsv3.backends.nvidia.ops import cublas_takes
    from dsv3.backends.triton.ops import triton_linear
    from dsv3.backends.triton.quant import act_quant
    read_bw, fp8_peak = ceil.read, ceil.fp8
    tab = Table("FP8 block-scaled linear (x bf16 -> y bf16; times include the 1x128 activation quantisation)",
                ["GEMM", "M", "N", "K", "dispatched us", "TFLOP/s", "GB/s", "floor us", "x floor",
                 "triton us", "cuBLAS us", "dispatched / cuBLAS", "triton / cuBLAS"])
    for name, n, k in GEMM_SHAPES:
        wbytes = n * k
        copies = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / wbytes)))
        ws = _random_fp8_weight(n, k, "cuda", copies)
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            flops, nbytes = 2 * m * n * k, wbytes + wbytes / 16384 * 4 + 2 * m * k + 2 * m * n
            floor = max(nbytes / read_bw, flops / fp8_peak)
            td, _ = time_calls([lambda w=w: ops["linear"](x, w) for w in ws])
            tt, _ = time_calls([lambda w=w: triton_linear(target, x, w) for w in ws])
            tc = None
            if cublas_takes(m, n, k, x.dtype):
                def cub(w):
                    xq, xs = act_quant(x, torch.float8_e4m3fn, scale_column_major=True)
                    return torch._scaled_mm(xq, w.data.t(), scale_a=xs, scale_b=w.scale.t(), out_dtype=x.dtype)
                try:
                    tc, _ = time_calls([lambda w=w: cub(w) for w in ws])
                except RuntimeError as e:
                    tc = f"n/a ({str(e).splitlines()[0][:40]})"
            cub_us = _us(tc) if isinstance(tc, float) else (tc or "n/a")
            tab.add(name, m, n, k, _us(td), flops / td / 1e12, nbytes / td / 1e9, _us(floor), td / floor, _us(tt),
                    cub_us, f"{tc / td:.2f}" if isinstance(tc, float) else "-",
                    f"{tc / tt:.2f}" if isinstance(tc, float) else "-")
        del ws
        torch.cuda.empty_cache()
    return tab


def op_table(ops, ceil) -> Table:
    import torch
    import torch.nn.functional as F
    from dsv3.backends.reference import ops as ref
    from dsv3.core.ops import GateSpec
    from dsv3.core.quant import quantize_act_fp8
    read_bw, fp8_peak, bf16_peak = ceil.read, ceil.fp8, ceil.bf16
    dev, bf = "cuda", torch.bfloat16
    tab = Table("Other ops (ratio = time / floor; baseline: torch)",
                ["op", "shape", "us", "achieved", "floor us", "x floor", "torch us", "torch / ours"])

    def row(op, shape, ours, base, nbytes=0.0, flops=0.0, flop_peak=fp8_peak, graph=True):
        t, _ = time_calls(ours, graph=graph)
        floor = max(nbytes / read_bw, flops / flop_peak)
        ach = f"{flops / t / 1e12:.0f} TFLOP/s" if flops / flop_peak > nbytes / read_bw else f"{nbytes / t / 1e9:.0f} GB/s"
        tb = None
        if base is not None:
            try:
                tb, _ = time_calls(base, calls=3, reps=3, graph=False)   # torch as users run it: eager
            except Exception:  # noqa: BLE001
                tb = None
        tab.add(op, shape, _us(t), ach, _us(floor), t / floor, _us(tb) if tb else "-", f"{tb / t:.2f}" if tb else "-")

    d = 7168
    for t in (1, 4096):
        x = torch.randn(t, d, device=dev, dtype=bf)
        row("quantize_act", f"{t}x{d}", [lambda: ops["quantize_act"](x, torch.float8_e4m3fn, False)],
            [lambda: quantize_act_fp8(x)], nbytes=t * d * 3 + t * d / 32)
    for t in (1, 64, 4096):
        x, r, w = torch.randn(t, d, device=dev, dtype=bf), torch.randn(t, d, device=dev, dtype=bf), torch.ones(d, device=dev, dtype=bf)
        row("add_rms_norm", f"{t}x{d}", [lambda: ops["add_rms_norm"](x, r, w, 1e-6)],
            [lambda: ref.add_rms_norm(x, r, w, 1e-6)], nbytes=4 * t * d * 2)
    t, h = 4096, 128
    q = torch.randn(t, h, 192, device=dev, dtype=bf)[..., 128:]
    pos = torch.randint(0, 4096, (t,), device=dev)
    ang = torch.rand(8192, 32, device=dev)
    cos, sin = ang.cos(), ang.sin()
    row("rope", f"{t}x{h}x64", [lambda: ops["rope"](q, pos, cos, sin)], [lambda: ref.rope(q, pos, cos, sin)],
        nbytes=2 * t * h * 64 * 2)
    g, u = torch.randn(4096, 18432, device=dev, dtype=bf), torch.randn(4096, 18432, device=dev, dtype=bf)
    row("silu_mul", "4096x18432", [lambda: ops["silu_mul"](g, u)], [lambda: ref.silu_mul(g, u)], nbytes=3 * g.numel() * 2)
    del g, u
    spec = GateSpec(8, 8, 4, True, 2.5)
    gw, gb = torch.randn(256, d, device=dev, dtype=bf) * 0.02, torch.randn(256, device=dev) * 0.01
    for t in (1, 64, 4096):
        x = torch.randn(t, d, device=dev, dtype=bf)
        row("moe_gate", f"{t}x{d}x256", [lambda: ops["moe_gate"](x, gw, gb, spec)], [lambda: ref.moe_gate(x, gw, gb, spec)],
            nbytes=256 * d * 2 + t * d * 2, flops=2 * t * 256 * d, flop_peak=bf16_peak)
    # fused MoE: floor = bytes of the experts the routing actually touches (+ activations)
    ex_bytes = 3 * 2048 * d
    experts = _random_fp8_experts(256, d, 2048, dev)
    for t in (1, 8, 64, 4096):
        x = torch.randn(t, d, device=dev, dtype=bf)
        wts, ids = ops["moe_gate"](x, gw, gb, spec)
        touched = int(torch.unique(ids).numel())
        row("moe_experts", f"T={t}, {touched} experts", [lambda: ops["moe_experts"](x, wts, ids, experts)],
            [lambda: ref.moe_experts(x, wts, ids, experts)] if t <= 64 else None,
            nbytes=touched * ex_bytes + 2 * t * d * 2, flops=2 * t * 8 * ex_bytes, graph=True)
    del experts
    torch.cuda.empty_cache()
    # MLA decode over the paged cache
    for b, ctx, cdt in ((1, 4096, bf), (8, 4096, bf), (64, 4096, bf), (64, 4096, torch.float8_e4m3fn)):
        bs = 64
        nb = b * ctx // bs
        cache = torch.randn(nb, bs, 576, device=dev, dtype=bf).to(cdt)
        table = torch.randperm(nb, device=dev, dtype=torch.int32).view(b, ctx // bs)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        ql, qr = torch.randn(b, 128, 512, device=dev, dtype=bf), torch.randn(b, 128, 64, device=dev, dtype=bf)
        nbytes = nb * bs * 576 * cache.element_size() + b * 128 * (576 + 512) * 2
        flops = 2 * b * 128 * ctx * (576 + 512)
        row("mla_decode", f"B={b} ctx={ctx} {str(cdt).split('.')[-1]}",
            [lambda: ops["mla_decode"](ql, qr, cache, table, lens, 0.1)],
            [lambda: ref.mla_decode(ql, qr, cache, table, lens, 0.1)] if b <= 8 else None,
            nbytes=nbytes, flops=flops, flop_peak=bf16_peak)
        del cache
    # MLA prefill: one 4096-token sequence, 128 heads, qk 192 / v 128, causal
    lq = 4096
    q, k = (torch.randn(lq, 128, 192, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(lq, 128, 128, device=dev, dtype=bf)
    cu = torch.tensor([0, lq], dtype=torch.int32, device=dev)
    flops = 2 * 128 * (lq * lq / 2) * (192 + 128)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                              scale=0.1)
    row("mla_prefill", f"1x{lq} H=128", [lambda: ops["mla_prefill"](q, k, v, cu, cu, 0.1)], [sdpa],
        nbytes=lq * 128 * (192 * 2 + 128 * 2) * 2, flops=flops, flop_peak=bf16_peak, graph=False)
    return tab


# -------------------------------------------------------------------------------------------- end to end
def build_model(registry, backend: str, layers: int, mtp: bool = False, parallel=None, device="cuda",
                dense: int = 1, hf: dict | None = None):
    """Full-width DeepSeek-V3 (or the model of `hf`) with `layers` layers, the first `dense` of them dense,
    and random FP8 weights made on the device (no files); `parallel` (a dsv3.parallel Mesh) builds one
    rank's slice."""
    import dataclasses
    import torch
    from dsv3.core.config import ModelConfig
    from dsv3.core.model import DeepseekV3, Linear
    from dsv3.plugins.manager import resolve_ops
    hf = dict(hf or DEEPSEEK_V3, num_hidden_layers=layers, first_k_dense_replace=dense,
              num_nextn_predict_layers=int(mtp))
    cfg = ModelConfig.from_hf(hf)
    ops = resolve_ops(registry, backend)
    from dsv3.core.layout import SINGLE
    with torch.device(device):
        model = DeepseekV3(cfg, ops, "fp8-block", torch.bfloat16, with_mtp=mtp, mesh=parallel or SINGLE)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Linear) and mod.format == "fp8-block":
                w = mod.weight.view(-1, mod.weight.shape[-1])
                for r0 in range(0, w.shape[0], 8192):        # random codes ~ N(0, 64), in chunks
                    r1 = min(r0 + 8192, w.shape[0])
                    w[r0:r1] = (torch.randn(r1 - r0, w.shape[1], device=device, generator=g, dtype=torch.bfloat16)
                                * 64).to(torch.float8_e4m3fn)
                getattr(mod, mod.scale_name).fill_(0.02 / 64)
        for name, p in model.named_parameters():
            if p.dtype == torch.bfloat16:
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02, generator=g)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.01, generator=g)
    model.prepare_weights()
    return model, cfg, ops, dataclasses


def depth_layout(depth: int, config_dense: int) -> tuple[int, int, int]:
    """(dense layers, stored dense layers, stored MoE layers) of a depth-shared model of `depth` layers."""
    dense = min(config_dense, max(depth - 1, 0))
    return dense, min(1, dense), min(STORED_MOE_LAYERS, depth - dense)


def share_depth(model, depth: int, dense: int) -> None:
    """In place: `model` (its stored layers: dense ones first, then MoE) becomes a `depth`-layer model whose
    first `dense` layers reuse the stored dense layer(s) and the rest the stored MoE layers in turn. Each
    layer keeps its own latent cache (caches are per layer index); the weights are shared storage."""
    import dataclasses
    from torch import nn
    cfg = model.cfg
    stored = list(model.model.layers[:cfg.num_hidden_layers])
    dense_blocks = [b for i, b in enumerate(stored) if not cfg.is_moe_layer(i)]
    moe_blocks = [b for i, b in enumerate(stored) if cfg.is_moe_layer(i)]
    if (dense and not dense_blocks) or (depth > dense and not moe_blocks):
        raise ValueError(f"cannot share {len(dense_blocks)} dense + {len(moe_blocks)} MoE stored layers into "
                         f"{dense} dense + {depth - dense} MoE")
    layers = [dense_blocks[i % len(dense_blocks)] if i < dense else moe_blocks[(i - dense) % len(moe_blocks)]
              for i in range(depth)]
    extra = list(model.model.layers[cfg.num_hidden_layers:])          # an MTP layer stays last
    model.model.layers = nn.ModuleList(layers + extra)
    model.cfg = dataclasses.replace(cfg, num_hidden_layers=depth, first_k_dense_replace=dense)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def step_bytes(model, touched: list[int], tokens: int, cache_tokens: int) -> dict:
    """Bytes one step must read, per logical layer (shared storage counted once per layer that reads it):
    every non-expert weight of each layer, the routed experts its tokens touch (`touched[j]` for the j-th
    MoE layer), the final norm and lm_head, the token embeddings, and `cache_tokens` cached latents per layer."""
    from dsv3.core.model import MoE
    cfg = model.cfg
    layer_bytes = experts = 0
    moe_seen = 0
    for i in range(cfg.num_hidden_layers):
        block = model.model.layers[i]
        routed = set()
        if isinstance(block.mlp, MoE):
            ex = block.mlp.experts
            routed = {id(p) for p in ex.parameters()}
            per_expert = sum(_nbytes([lin.weight[0], getattr(lin, lin.scale_name)[0]])
                             for lin in (ex.gate_proj, ex.up_proj, ex.down_proj))
            experts += per_expert * touched[moe_seen]
            moe_seen += 1
        layer_bytes += _nbytes(p for p in block.parameters() if id(p) not in routed)
    head = _nbytes(model.model.norm.parameters()) + _nbytes(model.lm_head.parameters())
    embed = tokens * cfg.hidden_size * model.model.embed_tokens.weight.element_size()
    cache = cfg.num_hidden_layers * cache_tokens * cfg.latent_dim * 2
    return {"weights": layer_bytes + experts + head + embed, "cache": cache, "total": layer_bytes + experts + head
            + embed + cache, "touched": sum(touched), "moe_layers": moe_seen}


def step_flops(model, seqs: int, tokens_per_seq: int) -> tuple[float, float]:
    """(FP8 GEMM FLOPs, attention FLOPs) of a prefill step of `seqs` fresh sequences, per logical layer:
    every projection once per token (kv_b over every context token), k routed experts + shared per token,
    causal attention with qk head dim nope + rope and v head dim."""
    from dsv3.core.model import MoE
    cfg = model.cfg
    toks = seqs * tokens_per_seq
    gemm = 0.0
    for i in range(cfg.num_hidden_layers):
        block = model.model.layers[i]
        gemm += 2 * toks * sum(p.numel() for n, p in block.named_parameters()
                               if n.endswith("proj.weight") and ".experts." not in f".{n}")
        if isinstance(block.mlp, MoE):
            gemm += 2 * toks * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    attn = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * seqs * (tokens_per_seq ** 2 / 2) * (
        cfg.qk_head_dim + cfg.v_head_dim)
    return gemm, attn


# kernel name fragments -> op class, first match wins (cuBLAS kernels: the dense head, absorbed MLA products)
OP_CLASSES = (
    ("gate", ("gate_logits", "moe_gate")),          # gate_logits: the two-launch router before issue 16
    ("MoE", ("moe_align", "moe_gemm", "moe_sum")),
    ("attention", ("mla_decode", "mla_prefill", "flash", "attention")),
    ("norms/rope/quant", ("rms_norm", "rope", "act_quant", "silu_mul", "write_latent_cache")),
    ("GEMM", ("fp8_gemm", "splitk", "gemm", "gemv", "nvjet", "xmma", "cutlass", "sm90", "cublas")),
)
CLASS_NAMES = tuple(c for c, _ in OP_CLASSES) + ("other",)


def op_class(kernel: str) -> str:
    name = kernel.lower()
    return next((c for c, frags in OP_CLASSES if any(f in name for f in frags)), "other")


def profile_kernels(step, steps: int = 3) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches per step, device seconds per step)} over `steps` calls of `step`."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            c = out.setdefault(e.name, [0, 0.0])
            c[0] += 1
            c[1] += (e.time_range.end - e.time_range.start) / 1e6
    return {k: (round(n / steps), t / steps) for k, (n, t) in out.items()}


def share_row(kernels: dict[str, tuple[int, float]]) -> tuple[float, dict[str, float], list[str]]:
    """(kernel seconds per step, {op class: share}, the top kernels as 'name xN us')."""
    total = sum(t for _, t in kernels.values()) or 1e-30
    share = dict.fromkeys(CLASS_NAMES, 0.0)
    for name, (_, t) in kernels.items():
        share[op_class(name)] += t / total
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:4]
    return total, share, [f"{n[:40]} x{c} {t * 1e6:.0f} us" for n, (c, t) in top]


def e2e_tables(registry, backend, ceil: Ceilings, depth, contexts, batches, prefills, profile=True) -> list[Table]:
    import torch
    from dsv3.backends.nvidia.graphs import BUCKETS, CudaGraphRunner
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.cache import LatentCache
    t0 = time.perf_counter()
    dense, stored_dense, stored_moe = depth_layout(depth, DEEPSEEK_V3["first_k_dense_replace"])
    model, cfg, ops, dataclasses = build_model(registry, backend, stored_dense + stored_moe, dense=stored_dense)
    share_depth(model, depth, dense)
    cfg = model.cfg
    torch.cuda.synchronize()
    stored_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"  model built in {time.perf_counter() - t0:.1f} s ({stored_gb:.1f} GB stored for {depth} layers)", flush=True)
    title = (f"End to end at depth {depth} ({dense} dense + {depth - dense} MoE layers; storage of {stored_dense} dense + "
             f"{stored_moe} MoE layers shared across depth, {stored_gb:.1f} GB), DeepSeek-V3 full width, random FP8 "
             f"weights, bf16 activations and latent cache; floor = bytes / streaming read {ceil.read / 1e12:.2f} TB/s "
             f"(decode) or the larger of that and FLOPs / the FP8 + BF16 peaks (prefill)")
    tab = Table(title, ["run", "ms", "tok/s", "GB read", "floor ms", "x floor", "floor basis"])
    prof_tab = Table("Where decode kernel time goes: torch.profiler over CUDA-graph replays, share of kernel time "
                     "per op class (GEMM: FP8 linears, lm_head, absorbed MLA products)",
                     ["run", "kernel ms/step", *CLASS_NAMES, "largest kernels per step"])
    bs = 64
    pre = [tuple(int(v) for v in p.split("x")) for p in prefills if p]   # "" (--prefill "") skips the prefill rows
    nseq = max([*batches, *(s for s, _ in pre)])
    per_seq = -(-(max([*contexts, *(n for _, n in pre)]) + bs) // bs)
    cache = LatentCache(depth, nseq * per_seq, bs, cfg.latent_dim, torch.bfloat16, "cuda")
    for layer in cache.layers:
        layer.normal_()
    touched: list[int] = []

    def counting(x, w, ids, ex, _inner=ops.moe_experts):
        touched.append(int(torch.unique(ids).numel()))
        return _inner(x, w, ids, ex)

    def count_touched(batch):
        touched.clear()
        with torch.inference_mode():
            model.set_ops(dataclasses.replace(ops, moe_experts=counting))
            model(batch, cache.layers)
            model.set_ops(ops)
        return list(touched)

    for ns, lp in pre:
        chunks = [Chunk([int(i) for i in torch.randint(2, cfg.vocab_size, (lp,))], 0,
                        list(range(s * per_seq, s * per_seq + -(-lp // bs)))) for s in range(ns)]
        batch = Batch.build(chunks, bs, "cuda")
        used = count_touched(batch)
        with torch.inference_mode():
            def prefill_step():
                h = model(batch, cache.layers)
                return model.logits(h[batch.last_rows])
            tp, _ = time_calls([prefill_step], calls=1, reps=3, graph=False)
        toks = ns * lp
        nb = step_bytes(model, used, toks, 0)
        gemm_f, attn_f = step_flops(model, ns, lp)
        flop_floor = gemm_f / ceil.fp8 + attn_f / ceil.bf16
        floor = max(flop_floor, nb["total"] / ceil.read)
        tab.add(f"prefill {ns}x{lp}", f"{tp * 1e3:.1f}", f"{toks / tp:.0f}", f"{nb['total'] / 1e9:.1f}",
                f"{floor * 1e3:.1f}", tp / floor,
                f"{(gemm_f + attn_f) / 1e12:.0f} TFLOP: FP8 GEMMs / FP8 peak + attention / BF16 peak"
                + ("" if flop_floor >= nb["total"] / ceil.read else "; bytes bound"))
        del batch
    torch.cuda.empty_cache()
    runner = CudaGraphRunner(model, bs, max_context=max(contexts) + bs,
                             buckets=tuple(b for b in BUCKETS if b <= max(batches)) or (max(batches),))
    for context in contexts:
        for b in batches:
            chunks = [Chunk([int(torch.randint(2, cfg.vocab_size, ()))], context,
                            list(range(s * per_seq, s * per_seq + -(-(context + 1) // bs))), decode=True)
                      for s in range(b)]
            batch = Batch.build(chunks, bs, "cuda")
            used = count_touched(batch)
            graphed = b <= runner.main.buckets[-1]

            def step():
                with torch.inference_mode():
                    h = runner(batch, cache.layers)
                    return model.logits(h)
            td, _ = time_calls([step], calls=1, reps=20, graph=False)
            nb = step_bytes(model, used, b, b * (context + 1))
            floor = nb["total"] / ceil.read
            run = f"decode batch {b}, context {context}" + ("" if graphed else " (eager: above the graph buckets)")
            tab.add(run, f"{td * 1e3:.2f}", f"{b / td:.0f}", f"{nb['total'] / 1e9:.1f}", f"{floor * 1e3:.2f}",
                    td / floor, f"weights of {depth} layers + {nb['touched']} routed experts touched + lm_head + "
                                f"{nb['cache'] / 1e9:.2f} GB latent cache")
            if profile:
                kernels = profile_kernels(step)
                for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:16]:
                    print(f"    {t * 1e6:9.1f} us/step  x{n:<4} {name[:110]}")
                total, share, top = share_row(kernels)
                prof_tab.add(run, f"{total * 1e3:.2f}", *(f"{share[c] * 100:.0f}%" for c in CLASS_NAMES),
                             "; ".join(top))
            del batch
    print(f"  graph replays: {runner.replays}, captured buckets: {sorted(runner.graphs)}")
    return [tab] + ([prof_tab] if profile else [])


def run(args) -> int:
    import os
    import subprocess
    from dsv3.core.errors import Dsv3Error
    from dsv3.plugins.manager import create_registry, resolve_ops
    registry = create_registry()
    spec = check_backend(registry, args.backend)         # before torch touches the device
    import torch
    if not torch.cuda.is_available():
        raise Dsv3Error(f"dsv3-run bench --backend {spec.name} needs a GPU here (torch.cuda.is_available() is False)")
    if spec.probe():
        raise Dsv3Error(f"backend {spec.name!r} cannot run here: {spec.probe()}")
    props = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    commit = os.environ.get("DSV3_COMMIT") or commit or "?"   # the device copy of the tree has no .git
    import triton
    head = (f"dsv3-run bench on {props.name} ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}, triton {triton.__version__}, "
            f"backend {spec.name}, commit {commit}")
    if spec.name == "cuda":
        from dsv3.backends.triton import pdl
        head += (", programmatic dependent launch " + ("on" if pdl.available() else "off") +
                 f" ({pdl.PDL_ENV}=1 asks for it)")
    print(head, flush=True)
    ceil = measure_ceilings()
    print(ceil.line(), flush=True)
    tables = []
    if args.part in ("ops", "all"):
        ops = resolve_ops(registry, spec.name)
        impls = {n: getattr(ops, n) for n in ("linear", "quantize_act", "add_rms_norm", "rope", "silu_mul",
                                               "moe_gate", "moe_experts", "mla_decode", "mla_prefill")}
        if spec.name == "cuda":
            from dsv3.backends.nvidia.ops import cuda_target
            target = cuda_target()
        else:
            from dsv3.backends.amd.ops import rocm_target
            target = rocm_target()
        tables.append(gemm_table(impls, target, ceil, [int(m) for m in args.gemm_m.split(",")]))
        tables.append(op_table(impls, ceil))
        torch.cuda.empty_cache()
    if args.part in ("e2e", "all"):
        tables += e2e_tables(registry, spec.name, ceil, args.depth, [int(c) for c in args.contexts.split(",")],
                             [int(b) for b in args.batches.split(",")], args.prefill.split(","),
                             profile=not args.no_profile)
    text = f"{head}\n\n{ceil.line()}\n\n" + "\n".join(t.markdown() for t in tables)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
