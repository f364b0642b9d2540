"""`dsv3-run bench`: how close the GPU backend runs to what the hardware allows.

(a) op level, at DeepSeek-V3 shapes: each op's time, achieved TFLOP/s or GB/s, its floor (bytes over
    the measured copy bandwidth, FLOPs over the measured FP8 cuBLAS peak; the larger), the ratio
    time / floor, and the library baseline beside it (cuBLAS block-scaled torch._scaled_mm for the
    FP8 GEMMs, torch for the rest). GEMMs show the op as dispatched and the Triton kernel alone.
(b) end to end: DeepSeek-V3 at full width and reduced depth (default 4 layers: 1 dense + 3 MoE),
    random FP8 weights generated on the GPU (no files), prefill tokens/s and decode ms/step at
    batch 1, 8, 64 beside the weight-read floor of the step.

Both ceilings are measured in the same run. Small ops are timed as CUDA-graph replays of many calls
(decode runs them that way); weight-streaming ops rotate over enough weight copies to defeat L2.
"""
from __future__ import annotations

import math
import statistics
import time

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
DEMO_DECODE_MS = 25.0   # the official demo, batch 1, this 4-layer model on one H100 (issue 5's figure)
L2_DEFEAT_BYTES = 256 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark ops at DeepSeek-V3 shapes and end-to-end decode/prefill",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", help="cuda (default) or rocm")
    p.add_argument("--part", choices=("ops", "e2e", "all"), default="all")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the end-to-end model (1 dense + rest MoE)")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence in the decode benchmark")
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    p.add_argument("--prefill", default="4x2048", help="prefill batch: SEQUENCESxTOKENS")
    p.add_argument("--gemm-m", default="1,16,64,512,4096,8192", help="M values of the GEMM table")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    p.set_defaults(func=run)


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


def measure_ceilings():
    """(copy bytes/s counting read + write, FP8 cuBLAS FLOP/s, BF16 cuBLAS FLOP/s), measured now."""
    import torch
    n = 1 << 28                                   # 1 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t, _ = time_calls([lambda: dst.copy_(src)], calls=5, reps=10)
    copy_bw = 2 * 4 * n / t
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    t8, _ = time_calls([lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)],
                       calls=5, reps=10)
    ah, bh = a.to(torch.bfloat16), b.to(torch.bfloat16)
    t16, _ = time_calls([lambda: ah @ bh.t()], calls=5, reps=10)
    return copy_bw, 2 * m ** 3 / t8, 2 * m ** 3 / t16


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


def gemm_table(ops, target, ceil, m_values) -> Table:
    import torch
    from dsv3.backends.nvidia.ops import cublas_takes
    from dsv3.backends.triton.ops import triton_linear
    from dsv3.backends.triton.quant import act_quant
    copy_bw, fp8_peak, _ = ceil
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
            floor = max(nbytes / copy_bw, flops / fp8_peak)
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
    from dsv3.core.ops import ExpertWeights, GateSpec
    from dsv3.core.quant import quantize_act_fp8
    from dsv3.core.weights import QuantWeight
    copy_bw, fp8_peak, bf16_peak = ceil
    dev, bf = "cuda", torch.bfloat16
    tab = Table("Other ops (ratio = time / floor; baseline: torch)",
                ["op", "shape", "us", "achieved", "floor us", "x floor", "torch us", "torch / ours"])

    def row(op, shape, ours, base, nbytes=0.0, flops=0.0, flop_peak=fp8_peak, graph=True):
        t, _ = time_calls(ours, graph=graph)
        floor = max(nbytes / copy_bw, flops / flop_peak)
        ach = f"{flops / t / 1e12:.0f} TFLOP/s" if flops / flop_peak > nbytes / copy_bw else f"{nbytes / t / 1e9:.0f} GB/s"
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
    stacks = []
    for n, k in ((2048, d), (2048, d), (d, 2048)):
        data = torch.empty(256, n, k, dtype=torch.float8_e4m3fn, device=dev)
        for e0 in range(0, 256, 32):
            data[e0:e0 + 32] = (torch.randn(32, n, k, device=dev, dtype=bf) * 64).to(torch.float8_e4m3fn)
        stacks.append(QuantWeight(data, (0.02 / 64) * torch.ones(256, -(-n // 128), -(-k // 128), device=dev),
                                  "fp8-block"))
    experts = ExpertWeights(*stacks)
    for t in (1, 8, 64, 4096):
        x = torch.randn(t, d, device=dev, dtype=bf)
        wts, ids = ops["moe_gate"](x, gw, gb, spec)
        touched = int(torch.unique(ids).numel())
        row("moe_experts", f"T={t}, {touched} experts", [lambda: ops["moe_experts"](x, wts, ids, experts)],
            [lambda: ref.moe_experts(x, wts, ids, experts)] if t <= 64 else None,
            nbytes=touched * ex_bytes + 2 * t * d * 2, flops=2 * t * 8 * ex_bytes, graph=True)
    del experts, stacks
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
def build_model(registry, backend: str, layers: int, mtp: bool = False, parallel=None, device="cuda"):
    """Full-width DeepSeek-V3 with `layers` layers and random FP8 weights made on the GPU (no files);
    `parallel` (a dsv3.parallel Mesh) builds one rank's slice."""
    import dataclasses
    import torch
    from dsv3.core.config import ModelConfig
    from dsv3.core.model import DeepseekV3, Linear
    from dsv3.plugins.manager import resolve_ops
    hf = dict(DEEPSEEK_V3, num_hidden_layers=layers, first_k_dense_replace=1, num_nextn_predict_layers=int(mtp))
    cfg = ModelConfig.from_hf(hf)
    ops = resolve_ops(registry, backend)
    from dsv3.parallel.mesh import SINGLE
    with torch.device(device):
        model = DeepseekV3(cfg, ops, "fp8-block", torch.bfloat16, with_mtp=mtp, parallel=parallel or SINGLE)
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
    return model, cfg, ops, dataclasses


def weight_bytes(model, cfg, touched_per_layer: list[int]) -> dict:
    """Bytes a decode step must read: every non-expert weight, the routed experts it touches, lm_head."""
    from dsv3.core.model import Experts
    total_routed = per_expert = 0
    for mod in model.modules():
        if isinstance(mod, Experts):
            per_expert = sum(lin.weight[0].numel() * lin.weight.element_size() +
                             getattr(lin, lin.scale_name)[0].numel() * 4
                             for lin in (mod.gate_proj, mod.up_proj, mod.down_proj))
            total_routed += sum(p.numel() * p.element_size() for p in mod.parameters())
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    dense_part = everything - total_routed - embed.numel() * embed.element_size()
    return {"non_expert": dense_part, "per_expert": per_expert, "touched": sum(touched_per_layer),
            "decode": dense_part + per_expert * sum(touched_per_layer), "all": everything}


def e2e_tables(registry, backend, ceil, layers, context, batches, prefill) -> Table:
    import dataclasses
    import torch
    from dsv3.backends.nvidia.graphs import CudaGraphRunner
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.cache import LatentCache
    copy_bw, fp8_peak, bf16_peak = ceil
    t0 = time.perf_counter()
    model, cfg, ops, _ = build_model(registry, backend, layers)
    torch.cuda.synchronize()
    print(f"  model built in {time.perf_counter() - t0:.1f} s ({sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9:.1f} GB)", flush=True)
    tab = Table(f"End to end: DeepSeek-V3 full width, {layers} layers (1 dense + {layers - 1} MoE), random FP8 "
                f"weights, bf16 activations and latent cache",
                ["run", "result", "time", "floor", "x floor", "floor basis"])
    bs = 64
    nseq = max(max(batches), int(prefill.split("x")[0]))
    per_seq = -(-(max(context, int(prefill.split("x")[1])) + 64) // bs)
    cache = LatentCache(layers, nseq * per_seq, bs, cfg.latent_dim, torch.bfloat16, "cuda")
    for layer in cache.layers:
        layer.normal_()
    # prefill
    ns, lp = (int(v) for v in prefill.split("x"))
    chunks = [Chunk([int(i) for i in torch.randint(2, cfg.vocab_size, (lp,))], 0,
                    list(range(s * per_seq, s * per_seq + -(-lp // bs)))) for s in range(ns)]
    batch = Batch.build(chunks, bs, "cuda")
    with torch.inference_mode():
        def prefill_step():
            h = model(batch, cache.layers)
            return model.logits(h[batch.last_rows])
        tp, _ = time_calls([prefill_step], calls=1, reps=3, graph=False)
    toks = ns * lp
    lin_flops = 2 * toks * sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight")
                               and "experts." not in n)
    moe_flops = 2 * toks * (layers - 1) * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    attn_flops = layers * 2 * cfg.num_attention_heads * ns * (lp * lp / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    floor_p = (lin_flops + moe_flops) / fp8_peak + attn_flops / bf16_peak
    tab.add(f"prefill {ns}x{lp}", f"{toks / tp:.0f} tok/s", f"{tp * 1e3:.1f} ms", f"{floor_p * 1e3:.1f} ms",
            tp / floor_p, "FP8 GEMM FLOPs / FP8 cuBLAS peak + attention FLOPs / BF16 peak")
    # decode, CUDA graphs per batch
    runner = CudaGraphRunner(model, bs, max_context=context + bs)
    for b in batches:
        chunks = [Chunk([int(torch.randint(2, cfg.vocab_size, ()))], context,
                        list(range(s * per_seq, s * per_seq + -(-(context + 1) // bs))), decode=True)
                  for s in range(b)]
        batch = Batch.build(chunks, bs, "cuda")
        touched = []

        def counting(x, w, ids, ex, _inner=ops.moe_experts):
            touched.append(int(torch.unique(ids).numel()))
            return _inner(x, w, ids, ex)
        with torch.inference_mode():
            model.set_ops(dataclasses.replace(ops, moe_experts=counting))
            model(batch, cache.layers)
            model.set_ops(ops)

            def step():
                h = runner(batch, cache.layers)
                return model.logits(h)
            td, _ = time_calls([step], calls=1, reps=20, graph=False)
        wb = weight_bytes(model, cfg, touched)
        kv = layers * b * (context + 1) * cfg.latent_dim * 2
        floor_d = (wb["decode"] + kv) / copy_bw
        tab.add(f"decode batch {b}, context {context}", f"{td * 1e3:.2f} ms/step ({b / td:.0f} tok/s)",
                f"{td * 1e3:.2f} ms", f"{floor_d * 1e3:.2f} ms", td / floor_d,
                f"{(wb['decode'] + kv) / 1e9:.2f} GB read: weights + {wb['touched']} routed experts touched + "
                f"lm_head + latent cache, / copy bandwidth" + (f"; official demo {DEMO_DECODE_MS:.0f} ms = "
                                                               f"{DEMO_DECODE_MS / (td * 1e3):.1f}x slower" if b == 1 else ""))
    print(f"  graph replays: {runner.replays}, captured buckets: {sorted(runner.graphs)}")
    return tab


def run(args) -> int:
    import torch
    from dsv3.core.errors import Dsv3Error
    from dsv3.plugins.manager import create_registry, resolve_ops
    if not torch.cuda.is_available():
        raise Dsv3Error("dsv3-run bench needs a GPU (torch.cuda.is_available() is False)")
    registry = create_registry()
    spec = registry.backend(args.backend)
    if spec.probe():
        raise Dsv3Error(f"backend {spec.name!r} cannot run here: {spec.probe()}")
    props = torch.cuda.get_device_properties(0)
    import os
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("DSV3_COMMIT", "?")   # the device copy of the tree may have no .git
    import triton
    head = (f"dsv3-run bench on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}, backend {spec.name}, commit {commit or '?'}")
    print(head, flush=True)
    ceil = measure_ceilings()
    ceil_line = (f"measured ceilings: copy {ceil[0] / 1e12:.2f} TB/s (read + write), FP8 cuBLAS "
                 f"{ceil[1] / 1e12:.0f} TFLOP/s, BF16 cuBLAS {ceil[2] / 1e12:.0f} TFLOP/s (8192^3)")
    print(ceil_line, flush=True)
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
    if args.part in ("e2e", "all"):
        tables.append(e2e_tables(registry, spec.name, ceil, args.layers, args.context,
                                 [int(b) for b in args.batches.split(",")], args.prefill))
    text = f"{head}\n\n{ceil_line}\n\n" + "\n".join(t.markdown() for t in tables)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
