"""`dsv3-run bench` on the CPU: its argument checks, and the depth-shared model and byte/FLOP counts
behind its end-to-end floors (the timing itself needs a GPU)."""
import torch

from dsv3.commands import bench
from dsv3.core.batch import Batch, Chunk
from dsv3.commands.main import main
from dsv3.core.model import MoE
from dsv3.checkpoints.synthetic import TINY_CONFIG
from dsv3.plugins.manager import create_registry


def test_cpu_backend_is_refused_before_anything_runs(capsys):
    assert main(["bench", "--backend", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "measures a GPU backend" in err and "--backend cuda" in err and "check --backend cpu" in err
    assert main(["bench", "--backend", "nosuch"]) == 2
    assert "unknown backend 'nosuch'" in capsys.readouterr().err


def test_depth_layout():
    assert bench.depth_layout(61, 3) == (3, 1, 2)        # V3: 3 dense + 58 MoE from 1 + 2 stored layers
    assert bench.depth_layout(4, 3) == (3, 1, 1)
    assert bench.depth_layout(1, 3) == (0, 0, 1)


def _tiny(depth, dense):
    reg = create_registry()
    _, stored_dense, stored_moe = bench.depth_layout(depth, dense)
    model, cfg, _, _ = bench.build_model(reg, "cpu", stored_dense + stored_moe, device="cpu", dense=stored_dense,
                                         hf=TINY_CONFIG)
    return model


def test_share_depth_reuses_storage_and_runs_every_layer():
    torch.manual_seed(0)
    model = _tiny(7, 2)
    stored = [model.model.layers[i] for i in range(3)]           # 1 dense, 2 MoE
    stored_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bench.share_depth(model, 7, 2)
    layers = list(model.model.layers)
    assert model.cfg.num_hidden_layers == 7 and model.cfg.first_k_dense_replace == 2
    assert layers[:2] == [stored[0]] * 2 and layers[2:7] == [stored[1], stored[2]] * 2 + [stored[1]]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == stored_bytes   # no new storage
    # the forward runs all 7 logical layers, each on its own cache
    cfg = model.cfg
    caches = [torch.zeros(4, 16, cfg.latent_dim, dtype=torch.bfloat16) for _ in range(7)]
    batch = Batch.build([Chunk([5, 9, 3], 0, [0])], 16, "cpu")
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o: calls.append(id(m))) for b in stored]
    with torch.inference_mode():
        h = model(batch, caches)
    for hk in hooks:
        hk.remove()
    assert calls == [id(b) for b in layers[:7]] and torch.isfinite(h.float()).all()
    assert all(c[0, :3].abs().sum() > 0 for c in caches)             # every layer wrote its own cache


def test_step_bytes_and_flops_count_each_logical_layer():
    model = _tiny(5, 1)
    bench.share_depth(model, 5, 1)
    cfg = model.cfg
    touched = [2, 3, 4, 5]                                           # per MoE layer
    nb = bench.step_bytes(model, touched, tokens=2, cache_tokens=10)

    def nbytes(ps):
        return sum(p.numel() * p.element_size() for p in ps)
    want = 0
    for i in range(5):
        block = model.model.layers[i]
        if isinstance(block.mlp, MoE):
            ex = block.mlp.experts
            routed = {id(p) for p in ex.parameters()}
            want += nbytes(p for p in block.parameters() if id(p) not in routed)
            e = touched[i - 1]
            want += e * nbytes([ex.gate_proj.weight[0], ex.up_proj.weight[0], ex.down_proj.weight[0],
                                ex.gate_proj.weight_scale_inv[0], ex.up_proj.weight_scale_inv[0],
                                ex.down_proj.weight_scale_inv[0]])
        else:
            want += nbytes(block.parameters())
    want += nbytes(model.lm_head.parameters()) + nbytes(model.model.norm.parameters()) + 2 * cfg.hidden_size * 2
    assert nb["weights"] == want and nb["moe_layers"] == 4 and nb["touched"] == 14
    assert nb["cache"] == 5 * 10 * cfg.latent_dim * 2 and nb["total"] == want + nb["cache"]
    gemm, attn = bench.step_flops(model, seqs=2, tokens_per_seq=8)
    per_tok = sum(p.numel() for i in range(5) for n, p in model.model.layers[i].named_parameters()
                  if n.endswith("proj.weight") and not n.startswith("mlp.experts."))
    per_tok += 4 * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    assert gemm == 2 * 16 * per_tok
    assert attn == 5 * 2 * cfg.num_attention_heads * 2 * 32 * (cfg.qk_head_dim + cfg.v_head_dim)


def test_op_classes():
    cases = {"fp8_gemm_kernel": "GEMM", "nvjet_tst_128x64_64x8": "GEMM", "moe_gemm_kernel": "MoE",
             "moe_gate_kernel": "gate", "gate_logits_kernel": "gate", "mla_decode_kernel": "attention",
             "add_rms_norm_quant_kernel": "norms/rope/quant", "rope_kernel": "norms/rope/quant",
             "void at::native::elementwise_kernel<128, 2>": "other"}
    assert {k: bench.op_class(k) for k in cases} == cases
    total, share, top = bench.share_row({"fp8_gemm_kernel": (4, 3e-6), "moe_gemm_kernel": (2, 1e-6)})
    assert abs(total - 4e-6) < 1e-12 and share["GEMM"] == 0.75 and share["MoE"] == 0.25 and share["other"] == 0
    assert top[0] == "fp8_gemm_kernel x4 3 us"
