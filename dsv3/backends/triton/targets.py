"""Compile-only checks: build every kernel of the op table for a GPU target with `triton.compile`
and a `GPUTarget`, on any machine (no GPU needed). This is how the AMD kernels are proven to build
here, where no AMD GPU can be reached.

    python -m dsv3.backends.triton.targets [cuda:90 hip:gfx942 hip:gfx950] [--json]

Each kernel is compiled at DeepSeek-V3 shapes with the launch parameters its tuning table picks
for that target (AMD: waves_per_eu, matrix_instr_nonkdim, kpack as options). Run without
TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from dsv3.backends.triton import dsa, elementwise, gate, gemm, mla, moe, norm, quant, tuning
from dsv3.core.quant import FP8_MAX

I32, F32 = "i32", "fp32"
DEFAULT_TARGETS = ("cuda:90", "hip:gfx942", "hip:gfx950")


def _target(spec: str) -> tuple[GPUTarget, tuning.Target]:
    backend, arch = spec.split(":")
    if backend == "cuda":
        return GPUTarget("cuda", int(arch), 32), tuning.Target("cuda", torch.float8_e4m3fn, 132)
    fp8 = torch.float8_e4m3fnuz if arch == "gfx942" else torch.float8_e4m3fn
    return GPUTarget("hip", arch, 64), tuning.Target(arch, fp8, 304 if arch == "gfx942" else 256)


def _sig(names: str, types: dict, consts: dict) -> dict:
    out = {}
    for n in names.split():
        out[n] = "constexpr" if n in consts else types.get(n, I32)
    return out


def kernel_specs(t: tuning.Target):
    """(label, jit kernel, signature, constexprs, launch options) for every kernel, as launched on `t`."""
    f8 = "fp8e4b8" if t.fp8_dtype == torch.float8_e4m3fnuz else "fp8e4nv"
    fmax = FP8_MAX[t.fp8_dtype]
    specs = []

    pdl_on = t.name == "cuda"   # compiled as launched on Hopper: with grid dependency control; AMD has none

    def add(label, kern, names, types, consts, num_warps=4, num_stages=3, extra=None):
        opts = {"num_warps": num_warps, "num_stages": num_stages, **(extra or {})}
        if "PDL" in kern.arg_names:
            names, consts = names + " PDL", consts | {"PDL": pdl_on}
            if pdl_on:
                opts["launch_pdl"] = True
        if "PREFETCH" in kern.arg_names:
            names, consts = names + " PREFETCH", consts | {"PREFETCH": 3 if pdl_on else 0}
        specs.append((label, kern, _sig(names, types, consts), consts, opts))

    add("act_quant", quant.act_quant_kernel, "x_ptr q_ptr s_ptr K num_groups stride_x stride_q stride_sr stride_sg "
        "FP8_MAX UE8M0 GROUP GROUPS", {"x_ptr": "*bf16", "q_ptr": "*" + f8, "s_ptr": "*fp32"},
        {"FP8_MAX": fmax, "UE8M0": False, "GROUP": 128, "GROUPS": 8})
    gemm_names = ("a_ptr as_ptr b_ptr bs_ptr c_ptr ws_ptr count_ptr M N K k_steps_per_split stride_am stride_asm "
                  "stride_bn stride_bsn stride_cm QUANT_A UE8M0 FP8_MAX BLOCK_M BLOCK_N BLOCK_K GROUP_M SPLIT")
    for m in (1, 128, 4096):   # split-K + in-GEMM quantisation, mid tiles, large tiles
        cfg = tuning.gemm_config(t, m, 7168, 7168)
        quant_a = m <= tuning.QUANT_IN_GEMM_MAX_M
        add(f"fp8_gemm[M={m}]", gemm.fp8_gemm_kernel, gemm_names,
            {"a_ptr": "*bf16" if quant_a else "*" + f8, "as_ptr": "*fp32", "b_ptr": "*" + f8, "bs_ptr": "*fp32",
             "c_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32"},
            {"QUANT_A": quant_a, "UE8M0": False, "FP8_MAX": fmax, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
             "BLOCK_K": 128, "GROUP_M": cfg.group_m, "SPLIT": cfg.split_k > 1}, cfg.num_warps, cfg.num_stages,
            cfg.extra)
    add("rms_norm+residual", norm.rms_norm_kernel, "x_ptr r_ptr w_ptr y_ptr h_ptr D stride_x stride_r stride_y "
        "stride_h eps HAS_RESIDUAL BLOCK_D", {n: "*bf16" for n in ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "h_ptr")} |
        {"eps": F32}, {"HAS_RESIDUAL": True, "BLOCK_D": 8192}, num_warps=16)
    add("rope", elementwise.rope_kernel, "x_ptr pos_ptr cos_ptr sin_ptr y_ptr H stride_xt stride_xh stride_yt "
        "stride_yh stride_cos HALF BLOCK_H BLOCK_P", {"x_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32",
                                                     "sin_ptr": "*fp32", "y_ptr": "*bf16"},
        {"HALF": 32, "BLOCK_H": 16, "BLOCK_P": 32})
    add("silu_mul", elementwise.silu_mul_kernel, "g_ptr u_ptr y_ptr N stride_g stride_u stride_y BLOCK",
        {"g_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16"}, {"BLOCK": 2048})
    for cache in ("bf16", f8):
        add(f"write_latent_cache[{cache}]", elementwise.write_latent_cache_kernel,
            "cache_ptr lat_ptr rope_ptr slot_ptr stride_slot stride_lat stride_rope C R BLOCK_C BLOCK_R",
            {"cache_ptr": "*" + cache, "lat_ptr": "*bf16", "rope_ptr": "*bf16", "slot_ptr": "*i64"},
            {"C": 512, "R": 64, "BLOCK_C": 512, "BLOCK_R": 64})
    for cache in ("bf16", f8):
        dcfg = tuning.mla_decode_config(t, 128, torch.bfloat16 if cache == "bf16" else t.fp8_dtype)
        for direct in (False, True):
            add(f"mla_decode[{cache},{'direct' if direct else 'split'}]", mla.mla_decode_kernel,
                "ql_ptr qr_ptr cache_ptr bt_ptr lens_ptr o_ptr lse_ptr H scale stride_qlt stride_qlh stride_qrt "
                "stride_qrh stride_cb stride_cs stride_bt stride_ot stride_oh stride_os stride_lt stride_lh splits C R "
                "BLOCK_C BLOCK_R PAGE BLOCK_H BLOCK_N DIRECT STAGES",
                {"ql_ptr": "*bf16", "qr_ptr": "*bf16", "cache_ptr": "*" + cache, "bt_ptr": "*i32", "lens_ptr": "*i32",
                 "o_ptr": "*bf16" if direct else "*fp32", "lse_ptr": "*fp32", "scale": F32},
                {"C": 512, "R": 64, "BLOCK_C": 512, "BLOCK_R": 64, "PAGE": 64, "BLOCK_H": dcfg.block_h,
                 "BLOCK_N": dcfg.block_n, "DIRECT": direct,
                 "STAGES": dcfg.num_stages}, dcfg.num_warps, dcfg.num_stages, dcfg.extra)
    add("mla_decode_combine", mla.mla_decode_combine_kernel, "o_part_ptr lse_ptr out_ptr H stride_pt stride_ph "
        "stride_ps stride_lt stride_lh stride_ot stride_oh S C BLOCK_S BLOCK_C",
        {"o_part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}, {"C": 512, "BLOCK_S": 8, "BLOCK_C": 512})
    pcfg = tuning.mla_prefill_config(t)
    add("mla_prefill", mla.mla_prefill_kernel, "q_ptr k_ptr v_ptr o_ptr cu_q_ptr cu_k_ptr scale stride_qt stride_qh "
        "stride_kt stride_kh stride_vt stride_vh stride_ot stride_oh DN DR DV BLOCK_DN BLOCK_DR BLOCK_DV BLOCK_M BLOCK_N",
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "cu_q_ptr": "*i32",
         "cu_k_ptr": "*i32", "scale": F32},
        {"DN": 128, "DR": 64, "DV": 128, "BLOCK_DN": 128, "BLOCK_DR": 64, "BLOCK_DV": 128,
         "BLOCK_M": pcfg.block_h, "BLOCK_N": pcfg.block_n}, pcfg.num_warps, pcfg.num_stages, pcfg.extra)
    for tokens in (1, 64, 4096):   # decode (16-expert tiles, routed 1 / 8 rows at a time) and prefill tiles
        bt, be, bd, splits, rt, warps = gate.gate_config(tokens, 256, 7168, t.num_sms)
        add(f"moe_gate[T={tokens}]", gate.moe_gate_kernel, "x_ptr w_ptr bias_ptr part_ptr count_ptr wout_ptr iout_ptr "
            "T D d_per_split stride_x stride_w routed_scale E N_GROUP TOPK_GROUP TOP_K NORM HAS_BIAS BLOCK_T BLOCK_E "
            "BLOCK_D ROUTE_T BLOCK_G BLOCK_EG BLOCK_K SPLITS",
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32",
             "wout_ptr": "*fp32", "iout_ptr": "*i64", "routed_scale": F32},
            {"E": 256, "N_GROUP": 8, "TOPK_GROUP": 4, "TOP_K": 8, "NORM": True, "HAS_BIAS": True, "BLOCK_T": bt,
             "BLOCK_E": be, "BLOCK_D": bd, "ROUTE_T": rt, "BLOCK_G": 8, "BLOCK_EG": 32, "BLOCK_K": 8,
             "SPLITS": splits}, num_warps=warps)
    add("moe_align", moe.moe_align_kernel, "ids_ptr sorted_ptr block_expert_ptr N first_expert max_blocks E BLOCK_M "
        "BLOCK_E CHUNK", {"ids_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32"},
        {"E": 256, "BLOCK_M": 16, "BLOCK_E": 512, "CHUNK": 1024})
    for rows in (8, 4096 * 8):       # decode (BLOCK_M 16) and prefill (BLOCK_M 128) tiles
        mcfg = tuning.moe_config(t, rows, 256)
        for gated in (True, False):
            add(f"moe_gemm[{'gate_up' if gated else 'down'},rows={rows}]", moe.moe_gemm_kernel,
                "a_ptr as_ptr b_ptr bs_ptr b2_ptr b2s_ptr out_ptr outs_ptr sorted_ptr block_expert_ptr topk_w_ptr "
                "N K num_rows a_row_div stride_am stride_asm stride_be stride_bn stride_bse stride_bsn stride_om "
                "stride_osm GATED UE8M0 FP8_MAX BLOCK_M BLOCK_N BLOCK_K",
                {"a_ptr": "*" + f8, "as_ptr": "*fp32", "b_ptr": "*" + f8, "bs_ptr": "*fp32", "b2_ptr": "*" + f8,
                 "b2s_ptr": "*fp32", "out_ptr": "*" + f8 if gated else "*bf16", "outs_ptr": "*fp32",
                 "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "topk_w_ptr": "*fp32"},
                {"GATED": gated, "UE8M0": False, "FP8_MAX": fmax, "BLOCK_M": mcfg.block_m,
                 "BLOCK_N": mcfg.block_n_up if gated else mcfg.block_n_down, "BLOCK_K": 128},
                mcfg.num_warps, mcfg.num_stages, mcfg.extra)
    for cache in ("bf16", f8):   # DeepSeek-V3.2 (DSA) at its shapes: 64 index heads of 128, rows 576 + 128
        add(f"write_index_cache[{cache}]", dsa.write_index_cache_kernel,
            "cache_ptr k_ptr slot_ptr stride_slot stride_k OFFSET D BLOCK_D",
            {"cache_ptr": "*" + cache, "k_ptr": "*bf16", "slot_ptr": "*i64"}, {"D": 128, "BLOCK_D": 128}, num_warps=1)
        add(f"index_scores[{cache}]", dsa.index_scores_kernel,
            "q_ptr w_ptr cache_ptr bt_ptr lens_ptr out_ptr HI N KOFF stride_qt stride_qh stride_wt stride_cb stride_cs "
            "stride_bt stride_ot DI BLOCK_H BLOCK_D PAGE BLOCK_N",
            {"q_ptr": "*bf16", "w_ptr": "*fp32", "cache_ptr": "*" + cache, "bt_ptr": "*i32", "lens_ptr": "*i32",
             "out_ptr": "*fp32"}, {"DI": 128, "BLOCK_H": 64, "BLOCK_D": 128, "PAGE": 64, "BLOCK_N": 64})
        for direct in (False, True):
            add(f"sparse_mla[{cache},{'direct' if direct else 'split'}]", dsa.sparse_mla_kernel,
                "ql_ptr qr_ptr cache_ptr slots_ptr o_ptr lse_ptr H K scale per_split stride_qlt stride_qlh stride_qrt "
                "stride_qrh stride_cs stride_st stride_ot stride_oh stride_os stride_lt stride_lh C R BLOCK_C BLOCK_R "
                "BLOCK_H BLOCK_N DIRECT",
                {"ql_ptr": "*bf16", "qr_ptr": "*bf16", "cache_ptr": "*" + cache, "slots_ptr": "*i64",
                 "o_ptr": "*bf16" if direct else "*fp32", "lse_ptr": "*fp32", "scale": F32},
                {"C": 512, "R": 64, "BLOCK_C": 512, "BLOCK_R": 64, "BLOCK_H": 16, "BLOCK_N": 32, "DIRECT": direct})
    add("sparse_mla_combine", dsa.sparse_mla_combine_kernel, "part_ptr lse_ptr out_ptr stride_pt stride_ph stride_ps "
        "stride_lt stride_lh stride_ot stride_oh S C BLOCK_S BLOCK_C",
        {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}, {"C": 512, "BLOCK_S": 64, "BLOCK_C": 512})
    for r in (0, 3):
        add(f"topk_hist[round {r}]", dsa.topk_hist_kernel, "s_ptr hist_ptr state_ptr N stride_s NEG_INF_UKEY ROUND CHUNK BLOCK",
            {"s_ptr": "*fp32", "hist_ptr": "*i32", "state_ptr": "*i64"},
            {"NEG_INF_UKEY": dsa.NEG_INF_UKEY, "ROUND": r, "CHUNK": 4096, "BLOCK": 1024})
    add("topk_choose", dsa.topk_choose_kernel, "hist_ptr state_ptr", {"hist_ptr": "*i32", "state_ptr": "*i64"}, {})
    add("topk_gather", dsa.topk_gather_kernel, "s_ptr bt_ptr out_ptr state_ptr count_ptr N K stride_s stride_bt stride_o "
        "NEG_INF_UKEY PAGE CHUNK BLOCK", {"s_ptr": "*fp32", "bt_ptr": "*i32", "out_ptr": "*i64", "state_ptr": "*i64",
                                          "count_ptr": "*i32"},
        {"NEG_INF_UKEY": dsa.NEG_INF_UKEY, "PAGE": 64, "CHUNK": 4096, "BLOCK": 1024})
    add("moe_sum", moe.moe_sum_kernel, "rows_ptr ids_ptr out_ptr D first_expert num_local stride_r stride_o TOP_K BLOCK",
        {"rows_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16"}, {"TOP_K": 8, "BLOCK": 1024})
    return specs


def compile_all(targets=DEFAULT_TARGETS) -> list[dict]:
    results = []
    for spec in targets:
        gpu, t = _target(spec)
        for label, kern, sig, consts, opts in kernel_specs(t):
            t0 = time.perf_counter()
            row = {"target": spec, "kernel": label, "fn": kern.__name__}
            try:
                src = triton.compiler.ASTSource(fn=kern, signature=sig, constexprs=consts)
                art = triton.compile(src, target=gpu, options=opts)
                binary = "cubin" if gpu.backend == "cuda" else "hsaco"
                ptx = art.asm.get("ptx", "")
                row.update(ok=binary in art.asm, binary=binary, bytes=len(art.asm.get(binary, b"")),
                           shared=art.metadata.shared, pdl=consts.get("PDL", False),
                           launch_pdl=bool(getattr(art.metadata, "launch_pdl", False)),
                           grid_wait=ptx.count("griddepcontrol.wait"), l2_prefetch=ptx.count("prefetch.global.L2"))
            except Exception as e:  # noqa: BLE001 - reported per kernel, the caller decides
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(row)
    return results


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    targets = [a for a in argv if not a.startswith("--")] or list(DEFAULT_TARGETS)
    results = compile_all(targets)
    if as_json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['target']:<11} {r['kernel']:<36} {'ok' if r['ok'] else 'FAIL ' + r.get('error', '')}"
                  f"{'' if not r['ok'] else '  ' + r['binary'] + ' ' + str(r['bytes']) + ' B, smem ' + str(r['shared'])}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
