"""`dsv3-run plan`: per-rank memory for the official 671B config, checked against the tensor inventory."""
import re
from pathlib import Path

import pytest
import torch

from dsv3.commands.plan import parse_size
from dsv3.commands.main import main
from dsv3.core.config import ModelConfig
from dsv3.parallel import memory
from dsv3.parallel.mesh import Mesh
from dsv3.parallel.sharding import slicer

from helpers import make_checkpoint, tiny_config
from test_official_layout import _inventory

OFFICIAL = Path(__file__).parent / "data" / "deepseek-v3-config.json"
GiB = 2**30


def _inventory_bytes(cfg: ModelConfig, mesh: Mesh) -> int:
    """Bytes rank `mesh.rank` reads from the official checkpoint, from the inventory alone: its
    experts, and of every split tensor the slice the loader's slicer keeps (scales: the covering blocks)."""
    inv, keep = _inventory(), slicer(cfg, mesh)
    first, count = mesh.expert_range(cfg.n_routed_experts)
    total = 0
    for name, (shape, dtype) in inv.items():
        m = re.search(r"\.experts\.(\d+)\.", name)
        if m and not first <= int(m[1]) < first + count:
            continue
        weight = name.removesuffix("_scale_inv")
        slices = keep(weight, tuple(inv[weight][0]))
        dims = list(shape)
        for i, s in enumerate(slices or ()):
            a, b, _ = s.indices(inv[weight][0][i])
            dims[i] = -(-b // 128) - a // 128 if name.endswith("_scale_inv") else b - a
        total += torch.Size(dims).numel() * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return total


@pytest.mark.parametrize("world,tp,ep", [(1, 1, 1), (8, 8, 8), (16, 16, 16), (16, 8, 4)])
def test_weights_per_rank_match_the_official_inventory(world, tp, ep):
    cfg = ModelConfig.from_file(OFFICIAL)
    for rank in sorted({0, world - 1}):
        mesh = Mesh(world, rank, tp, ep)
        assert memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, mesh) == _inventory_bytes(cfg, mesh)
    if world == 1:   # the whole checkpoint: 641.3 GiB
        assert round(memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh()) / GiB, 1) == 641.3


def _plan(capsys, *args):
    code = main(["plan", *args])
    return code, capsys.readouterr()


def test_official_config_on_80_and_141_gib(capsys):
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "80GiB")
    assert code == 0, out.err
    assert "needs 16 GPUs (tp 16, ep 16)" in out.out
    # 8 x 80 GiB is too small; 81.3 GiB of checkpoint tensors per rank, less the MTP copies (shared)
    assert re.search(r"^\s+8\s+8\s+8\s+80\.8 GiB\s+0\.2 GiB\s+17\.4 GiB.*no$", out.out, re.M)
    assert "71,424 bytes per token" in out.out                                     # 62 x 576 x 2
    assert "--nnodes 2" in out.out
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB")
    assert code == 0 and "needs 8 GPUs (tp 8, ep 8)" in out.out
    # a smaller cache changes the cache line, not the weights
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB",
                      "--max-cache-tokens", "65536")
    assert "80.8 GiB weights + 0.2 GiB absorbed MLA weights + 4.4 GiB latent cache" in out.out


def test_bf16_profile_and_fixed_layout(capsys):
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-bf16", "--gpu-memory", "80GiB",
                      "--tp", "8", "--ep", "32")
    assert code == 0, out.err
    rows = re.findall(r"^\s+(\d+)\s+8\s+32\s", out.out, re.M)
    assert rows and all(int(n) % 32 == 0 for n in rows)       # only world sizes that tp and ep divide
    assert "needs 32 GPUs (tp 8, ep 32)" in out.out


def test_tiny_checkpoint_dir_fits_one_gpu(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=0, tokenizer=False)
    code, out = _plan(capsys, "--model", str(path), "--profile", "cpu", "--gpu-memory", "4GiB")
    assert code == 0 and "needs 1 GPU (tp 1, ep 1)" in out.out and "launch:" not in out.out


def test_does_not_fit_and_bad_input(capsys):
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "8GiB")
    assert code == 1 and "does not fit" in out.out
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "lots")
    assert code == 2 and "--gpu-memory 'lots'" in out.err
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "80GiB", "--tp", "3")
    assert code == 2 and "tp=3" in out.err and "does not split 3 ways" in out.err and out.out == ""


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB and parse_size("80") == 80 * GiB
    assert parse_size("96GB") == 96 * 10**9 and parse_size("141 gib") == 141 * GiB and parse_size("0.5TiB") == 512 * GiB


def test_plan_counts_the_absorbed_mla_weights():
    """W_UK [H/tp, 128, 512] + W_UV [H/tp, 128, 512] in bf16 per MLA layer (61 + the MTP layer): the
    ~33.5 MB per layer decode keeps beside the checkpoint's tensors, made once the weights are loaded."""
    cfg = ModelConfig.from_file(OFFICIAL)
    per_layer = 128 * (128 + 128) * 512 * 2
    assert per_layer == 33_554_432
    for tp in (1, 8):
        got = memory.absorbed_bytes(cfg, torch.bfloat16, True, Mesh(8, 0, tp, 8))
        assert got == 62 * per_layer // tp
    m = memory.rank_memory(cfg, 8, 8, 8, "fp8-block", torch.bfloat16, torch.bfloat16, 1024, 256, True)
    assert m.absorbed == 62 * per_layer // 8 and m.total == m.weights + m.absorbed + m.cache + m.activations + m.reserve


def test_prepared_absorbed_weights_are_kv_b_split_per_head(tmp_path):
    from dsv3 import LLM
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config())
    llm = LLM(path, backend="cpu")
    attn = llm.model.model.layers[0].self_attn
    kv_b = attn.kv_b_proj.qweight.data.float().view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)
    assert torch.equal(attn.w_uk.float(), kv_b[:, : attn.nope]) and torch.equal(attn.w_uv.float(), kv_b[:, attn.nope:])


def test_plan_counts_equal_mtp_copies_once(tmp_path, capsys):
    """The MTP layer's embedding and head: 2 x ceil(V/tp) x D bf16 per rank fewer when shared (the
    official checkpoints' copies are equal); counted when the checkpoint stores them otherwise."""
    cfg = ModelConfig.from_file(OFFICIAL)
    copies = 2 * -(-cfg.vocab_size // 8) * cfg.hidden_size * 2
    args = (cfg, 8, 8, 8, "fp8-block", torch.bfloat16, torch.bfloat16, 1024, 256, True)
    shared, separate = memory.rank_memory(*args, shared=True), memory.rank_memory(*args)
    assert shared.mtp_copies == separate.mtp_copies == copies
    assert separate.weights - shared.weights == copies and separate.total - shared.total == copies
    assert separate.weights == memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 8, 8))
    # a checkpoint directory: alike headers count once; an MTP head stored in another dtype, twice
    from dsv3.checkpoints.synthetic import random_weights, to_checkpoint_format, write_checkpoint
    hf = tiny_config()
    tensors = to_checkpoint_format(random_weights(ModelConfig.from_hf(hf), 0), "dense", torch.bfloat16)
    write_checkpoint(tmp_path / "alike", hf, tensors)
    head = f"model.layers.{hf['num_hidden_layers']}.shared_head.head.weight"
    write_checkpoint(tmp_path / "unlike", hf, {**tensors, head: tensors[head].float()})
    for name in ("alike", "unlike"):
        code, out = _plan(capsys, "--model", str(tmp_path / name), "--profile", "cpu", "--gpu-memory", "4GiB")
        assert code == 0
        assert ("counted once" in out.out) == (name == "alike") and ("counted on their own" in out.out) == (name == "unlike")
