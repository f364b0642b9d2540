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


# -- data-parallel attention (parallel.dp): per-rank weights, the system's distinct cache, the comparison ----

_SPLIT_BY_TP = re.compile(r"(embed_tokens|lm_head|shared_head\.head)\.weight$"
                          r"|\.self_attn\.(q_b_proj|kv_b_proj|o_proj)\.weight(_scale_inv)?$"
                          r"|\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
_ROUTED = re.compile(r"\.mlp\.experts\.(\d+)\.")
_MTP_COPIES = ("model.layers.61.embed_tokens.weight", "model.layers.61.shared_head.head.weight")


def _nbytes(shape, dtype: str) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def _inventory_dp_rank0(experts_per_rank: int) -> int:
    """Rank 0's bytes under tp = 1, from the inventory's names alone: every tensor whole except the routed
    experts, of which it holds experts 0 .. experts_per_rank - 1."""
    return sum(_nbytes(shape, dtype) for name, (shape, dtype) in _inventory().items()
               if not ((m := _ROUTED.search(name)) and int(m[1]) >= experts_per_rank))


def test_dp_layout_weights_per_rank_match_the_inventory():
    """dp = 8, ep = 8, tp = 1 on 8 GPUs: attention, dense MLPs, shared experts, embedding and heads whole on
    every rank (replicated), 32 of the 256 routed experts."""
    cfg = ModelConfig.from_file(OFFICIAL)
    dp8 = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 1, 8, dp=8))
    assert dp8 == _inventory_dp_rank0(32) == _inventory_bytes(cfg, Mesh(8, 0, 1, 8, dp=8))
    assert dp8 == memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 1, 8))   # dp: no weight change
    # tp = 8 holds 1/8 of every tensor it splits (on V3 every split falls on whole FP8 blocks and vocab rows)
    split = sum(_nbytes(s, d) for n, (s, d) in _inventory().items() if _SPLIT_BY_TP.search(n))
    assert split % 8 == 0
    tp8 = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 8, 8))
    assert dp8 - tp8 == split * 7 // 8 and dp8 > tp8
    # what the plan reports: the MTP copies counted once (shared), W_UK / W_UV whole (62 layers x 33.5 MB)
    m = memory.rank_memory(cfg, 8, 1, 8, "fp8-block", torch.bfloat16, torch.bfloat16, 1024, 8192, True, True, dp=8)
    copies = sum(_nbytes(*_inventory()[n]) for n in _MTP_COPIES)
    assert m.dp == 8 and m.weights == dp8 - copies and m.absorbed == 62 * 33_554_432
    # the mixed layout dp = 4 x tp = 2: attention etc. split 2 ways
    dp4 = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 2, 8, dp=4))
    assert dp4 == _inventory_bytes(cfg, Mesh(8, 0, 2, 8, dp=4)) == dp8 - split // 2


def _layout_rows(out: str) -> dict[str, list[str]]:
    """The comparison table's rows: layout label -> its cells."""
    table = out.split("\nlayouts of ", 1)[1].splitlines()[2:]
    rows = {}
    for line in table:
        m = re.match(r"((?:tp|dp)=\S+(?: x tp=\d+)?, (?:ep|tp)=\d+(?:, tp=1| \(dp=1\))?)\s+(.*)$", line)
        if m:
            rows[m[1]] = re.split(r"\s{2,}", m[2].strip())
    return rows


def _tokens(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_dp_system_holds_dp_ranks_of_distinct_cache(capsys):
    """8 x 141 GiB: under tp = 8 every rank caches every sequence (the latent is shared by all heads), so the
    system holds one rank's tokens; under dp = 8 each rank caches its own group's, 8 ranks' worth."""
    cfg = ModelConfig.from_file(OFFICIAL)
    gpu, per_token, block = 141 * GiB, 62 * 576 * 2, 64
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB")
    assert code == 0 and "needs 8 GPUs (tp 8, ep 8)" in out.out
    rows = _layout_rows(out.out)
    assert list(rows) == ["tp=8, ep=8 (dp=1)", "dp=2 x tp=4, ep=8", "dp=4 x tp=2, ep=8", "dp=8, ep=8, tp=1"]
    copies = sum(_nbytes(*_inventory()[n]) for n in _MTP_COPIES)

    def expected(weights, absorbed, tp, dp):   # one rank's tokens, from the inventory's bytes, in whole blocks
        act = memory.activation_bytes(cfg, Mesh(8, 0, tp, 8, dp=dp), torch.bfloat16, 8192)   # the estimate
        return (gpu - weights - absorbed - act - memory.RESERVE) // per_token // block * block

    tp8 = memory.weight_bytes(cfg, "fp8-block", torch.bfloat16, True, Mesh(8, 0, 8, 8)) - copies // 8   # vocab rows / 8
    one_rank_tp = expected(tp8, 62 * 33_554_432 // 8, 8, 1)
    one_rank_dp = expected(_inventory_dp_rank0(32) - copies, 62 * 33_554_432, 1, 8)
    weights, _, _, _, tokens, distinct, b4k, b32k = rows["tp=8, ep=8 (dp=1)"]
    assert weights == "80.8 GiB" and _tokens(tokens) == _tokens(distinct) == one_rank_tp
    assert _tokens(b4k) == one_rank_tp // 4096 and _tokens(b32k) == one_rank_tp // 32768
    weights, absorbed, _, _, tokens, distinct, b4k, b32k = rows["dp=8, ep=8, tp=1"]
    assert weights == f"{(_inventory_dp_rank0(32) - copies) / GiB:.1f} GiB" and absorbed == "1.9 GiB"
    assert _tokens(tokens) == one_rank_dp and _tokens(distinct) == 8 * one_rank_dp
    assert _tokens(b4k) == 8 * (one_rank_dp // 4096) and _tokens(b32k) == 8 * (one_rank_dp // 32768)
    # dp = 8 holds ~4.9x the distinct tokens of tp = 8, not 8x: of the 56 GiB per rank tp = 8 leaves for
    # cache, attention, the dense layers, shared experts and vocabulary whole take 14.8 GiB of weights and
    # 1.7 GiB of absorbed MLA weights, and the activation estimate 5.5 GiB (8 groups' tokens at the experts)
    ratio = _tokens(distinct) / one_rank_tp
    assert 4.5 < ratio < 5.5
    # even with no activations at all it stays under 7x: the bound is the weights alone (inventory bytes)
    free_tp = gpu - tp8 - 62 * 33_554_432 // 8 - memory.RESERVE
    free_dp = gpu - (_inventory_dp_rank0(32) - copies) - 62 * 33_554_432 - memory.RESERVE
    assert 5.5 < 8 * free_dp / free_tp < 6
    # the mixed layout: 4 groups, each rank's cache in between
    assert one_rank_tp > _tokens(rows["dp=4 x tp=2, ep=8"][4]) > one_rank_dp


def test_plan_with_dp(tmp_path, capsys):
    base = ("--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB")
    code, out = _plan(capsys, *base, "--dp", "8")
    assert code == 0, out.err
    assert re.search(r"^\s+8\s+1\s+8\s+8\s+95\.6 GiB\s+1\.9 GiB\s+17\.4 GiB.*yes$", out.out, re.M)
    assert "needs 8 GPUs (tp 1, ep 8, dp 8)" in out.out and "--dp 8 --tp 1 --ep 8" in out.out
    fit = int(re.search(r"\(([\d,]+) in all\)", out.out)[1].replace(",", ""))
    assert f"the system holds 8 x {fit:,} = {8 * fit:,} distinct tokens" in out.out
    code, out = _plan(capsys, *base, "--gpus", "8", "--dp", "4")
    assert code == 0 and "needs 8 GPUs (tp 2, ep 8, dp 4)" in out.out
    # the profile's parallel.dp, as --dp
    profile = tmp_path / "dp.yaml"
    profile.write_text((Path(memory.__file__).parents[1] / "configs" / "cuda-fp8.yaml").read_text()
                       + "parallel: {dp: 8}\n")
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", str(profile), "--gpu-memory", "141GiB")
    assert code == 0 and "needs 8 GPUs (tp 1, ep 8, dp 8)" in out.out
    # 16 x 80 GiB: the plan's own 16 GPUs, compared
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "80GiB")
    assert code == 0 and list(_layout_rows(out.out)) == [
        "tp=16, ep=16 (dp=1)", "dp=2 x tp=8, ep=16", "dp=4 x tp=4, ep=16", "dp=8 x tp=2, ep=16", "dp=16, ep=16, tp=1"]
    # one GPU: nothing to compare
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=0, tokenizer=False)
    code, out = _plan(capsys, "--model", str(path), "--profile", "cpu", "--gpu-memory", "4GiB")
    assert code == 0 and "layouts of" not in out.out


@pytest.mark.parametrize("args,rule", [
    (("--gpus", "8", "--dp", "3"), "parallel.dp = 3 does not divide the world size 8"),
    (("--gpus", "8", "--dp", "4", "--tp", "4"), "parallel.dp = 4 x parallel.tp = 4 must equal the world size 8"),
    (("--dp", "8", "--ep", "3"), "parallel.ep = 3 does not divide the world size 8"),
    (("--dp", "2", "--tp", "3"), "parallel.tp: num_attention_heads = 128 does not split 3 ways"),
])
def test_impossible_dp_layouts_are_refused(capsys, args, rule):
    code, out = _plan(capsys, "--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB", *args)
    assert code == 2 and out.out == ""
    assert "cannot run this model: " in out.err and rule in out.err and "dp: " in out.err


def test_fixed_gpu_count(capsys):
    base = ("--config", str(OFFICIAL), "--profile", "cuda-fp8", "--gpu-memory", "141GiB")
    code, out = _plan(capsys, *base, "--gpus", "16")
    assert code == 0 and "needs 16 GPUs (tp 16, ep 16)" in out.out and "layouts of 16 x 141.0 GiB" in out.out
    code, out = _plan(capsys, *base, "--gpus", "3")
    assert code == 2 and "3 GPUs cannot split this model" in out.err and "does not split 3 ways" in out.err
