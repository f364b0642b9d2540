"""Tensor and expert parallelism on the CPU with gloo: N processes give what one process gives.

The oracle is the single-process model on the same checkpoint: logits within 1e-5 (fp32), the same
greedy tokens, the same MTP logits; every rank must hold identical logits and sample identical
tokens. Each test spawns one process group and runs several layouts in it (building a model is
cheap; starting processes is not). Checkpoints are fresh random weights each run.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dsv3 import LLM
from dsv3.core.config import ModelConfig
from dsv3.core.errors import ProfileError
from dsv3.core.profile import load_profile, with_overrides
from dsv3.parallel.mesh import Mesh, wire
from dsv3.parallel.sharding import layout_problems

from helpers import make_checkpoint, random_prompts, rel_err, tiny_config

ALL_TO_ALL, SYNC_FREE = 0, 10**9      # ProcessGroups.sync_free_max_tokens: force one MoE path or the other
LENGTHS = [37, 5, 20]                 # ragged prompts: token shards of different sizes on each rank

# 6 heads (3 per rank at tp=2), 6 experts in 3 groups (3 per rank at ep=2: a token visits 1 or 2
# ranks), vocab 509 (prime: uneven vocab slices)
CONFIG_2 = tiny_config(num_attention_heads=6, num_key_value_heads=6, n_routed_experts=6, n_group=3, topk_group=2,
                       num_experts_per_tok=2, vocab_size=509)
# 4 heads, 12 experts in 4 groups of 3, top-3 from 2 groups: at ep=4 each rank is one group, so a
# token visits at most 2 of 4 ranks; moe_intermediate 32 splits 4 ways when ep=1
CONFIG_4 = tiny_config(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3, vocab_size=509)
# FP8 with every per-rank slice on the 128 grid at tp=2: 4 heads x (128 nope + 64 rope) q rows,
# 4 x (128 + 128) kv_b rows, v 128 per head; dense and shared intermediate 256
CONFIG_FP8 = tiny_config(hidden_size=128, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, intermediate_size=256, moe_intermediate_size=256,
                         num_hidden_layers=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, timeout_s: float) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DSV3_DIST_TIMEOUT": str(timeout_s)}


def _run_cases(llm_cases, prompts, seed):
    """What each layout produces on this rank."""
    out = {}
    for key, (path, tp, ep, sync_free) in llm_cases.items():
        llm = LLM(path, profile=with_overrides(load_profile("cpu"), {"parallel.tp": tp, "parallel.ep": ep}))
        llm.mesh.comm.sync_free_max_tokens = sync_free
        greedy, _ = llm.generate_ids(prompts, max_new_tokens=5, ignore_eos=True)
        sampled, _ = llm.generate_ids(prompts, max_new_tokens=5, ignore_eos=True, temperature=1.0, seed=seed)
        unseeded, _ = llm.generate_ids(prompts[:1], max_new_tokens=5, ignore_eos=True, temperature=1.0)
        out[key] = {"logits": llm.logits(prompts), "mtp": llm.mtp_logits(prompts), "greedy": greedy,
                    "sampled": sampled, "unseeded": unseeded, "bytes_read": llm.ckpt.bytes_read,
                    "mesh": (llm.mesh.world, llm.mesh.tp, llm.mesh.ep)}
    return out


def _worker(rank, world, port, job, out_dir, timeout_s, fault):
    os.environ.update(_env(rank, world, port, timeout_s))
    torch.set_num_threads(1)   # one core per rank (torchrun sets OMP_NUM_THREADS=1 for the same reason)
    result = {}
    try:
        if fault is None:
            result = _run_cases(*job)
        else:
            llm = LLM(job[0], profile=with_overrides(load_profile("cpu"), {"parallel.tp": world, "parallel.ep": world}))
            if rank == 1 and fault == "die":
                os._exit(3)                                # a crash: no error message, no goodbye
            if rank == 1 and fault == "stall":
                time.sleep(timeout_s + 3)                  # misses the collective, then finds its peer gone
            t0 = time.monotonic()
            try:
                llm.logits(job[1])
            finally:
                result["seconds"] = time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the message
        result["error"] = f"{type(e).__name__}: {e}"
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawn(world, tmp_path, job, timeout_s=60.0, fault=None, limit=150, worker=None):
    """`world` spawned ranks each running worker(rank, world, port, job, out_dir, timeout_s, fault) (default
    _worker), which saves its result as rank{r}.pt; -> (results, exit codes). A rank still running after
    `limit` seconds fails the test as a hang."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=worker or _worker, args=(r, world, port, job, str(tmp_path), timeout_s, fault))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {limit} s: a hang"
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else None
            for r in range(world)], [p.exitcode for p in procs]


def _single(path, prompts, seed):
    llm = LLM(path, backend="cpu")
    return {"logits": llm.logits(prompts), "mtp": llm.mtp_logits(prompts),
            "greedy": llm.generate_ids(prompts, max_new_tokens=5, ignore_eos=True)[0],
            "bytes": sum(llm.ckpt.nbytes(n) for n in llm.ckpt.names())}


def _check(ranks, cases, refs):
    for r, res in enumerate(ranks):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}"
    for key in cases:
        path = cases[key][0]
        ref, got = refs[path], [res[key] for res in ranks]
        for r, g in enumerate(got):
            err = rel_err(g["logits"], ref["logits"])
            assert err < 1e-5, f"{key} rank {r}: logits relative error {err:.2e}"
            assert rel_err(g["mtp"], ref["mtp"]) < 1e-5, f"{key} rank {r}: MTP logits"
            assert g["greedy"] == ref["greedy"], f"{key} rank {r}: greedy tokens differ from one process"
            if len(got) > 1:
                assert g["bytes_read"] < ref["bytes"], f"{key} rank {r} read the whole checkpoint"
            for field in ("logits", "mtp"):      # bit-identical across ranks: they sample alike
                assert torch.equal(g[field], got[0][field]), f"{key}: rank {r} {field} differ from rank 0"
            for field in ("sampled", "unseeded"):
                assert g[field] == got[0][field], f"{key}: rank {r} sampled other tokens than rank 0"


@pytest.fixture(scope="module")
def seed():
    return random.randrange(2**31)


def test_two_processes_tp_ep_and_both_moe_paths(tmp_path, seed):
    dense, _ = make_checkpoint(tmp_path / "dense", CONFIG_2, seed=seed)
    fp8, _ = make_checkpoint(tmp_path / "fp8", CONFIG_FP8, seed=seed + 1, fmt="fp8-block", num_shards=3)
    prompts = random_prompts(509, LENGTHS, seed)
    cases = {f"tp{tp}-ep{ep}-{name}": (str(dense), tp, ep, path)
             for tp, ep in ((2, 1), (1, 2), (2, 2)) for name, path in (("a2a", ALL_TO_ALL), ("sync-free", SYNC_FREE))}
    cases["fp8-tp2-ep2"] = (str(fp8), 2, 2, ALL_TO_ALL)
    refs = {str(dense): _single(dense, prompts, seed), str(fp8): _single(fp8, prompts, seed)}
    ranks, _ = _spawn(2, tmp_path, (cases, prompts, seed))
    _check(ranks, cases, refs)
    for r in range(2):   # whole split: each rank reads its half of the big tensors and all of the small ones
        assert ranks[r]["tp2-ep2-a2a"]["bytes_read"] < 0.6 * refs[str(dense)]["bytes"]


def test_four_processes_tp_ep_grid(tmp_path, seed):
    path, _ = make_checkpoint(tmp_path / "ckpt", CONFIG_4, seed=seed, num_shards=2)
    prompts = random_prompts(509, LENGTHS, seed + 7)
    cases = {"tp4-ep1-a2a": (str(path), 4, 1, ALL_TO_ALL),        # tp only: experts split by rows 4 ways
             "tp1-ep4-a2a": (str(path), 1, 4, ALL_TO_ALL),        # ep only: attention replicated
             "tp2-ep2-a2a": (str(path), 2, 2, ALL_TO_ALL),        # 2 expert groups, each expert split 2 ways
             "tp2-ep4-sync-free": (str(path), 2, 4, SYNC_FREE),
             "tp4-ep4-a2a": (str(path), 4, 4, ALL_TO_ALL)}
    refs = {str(path): _single(path, prompts, seed)}
    ranks, _ = _spawn(4, tmp_path, (cases, prompts, seed))
    _check(ranks, cases, refs)
    assert ranks[3]["tp2-ep2-a2a"]["mesh"] == (4, 2, 2)
    for r in range(4):
        assert ranks[r]["tp4-ep4-a2a"]["bytes_read"] < 0.4 * refs[str(path)]["bytes"]


def test_one_rank_under_torchrun_runs_every_collective(tmp_path, seed):
    """WORLD_SIZE 1 with RANK set (torchrun --nproc-per-node 1): a process group of one, every collective
    and both MoE paths run (what the NCCL check on one GPU exercises), and nothing changes."""
    path, _ = make_checkpoint(tmp_path / "ckpt", CONFIG_2, seed=seed)
    prompts = random_prompts(509, LENGTHS, seed)
    cases = {"a2a": (str(path), 1, 1, ALL_TO_ALL), "sync-free": (str(path), 1, 1, SYNC_FREE)}
    ref = _single(path, prompts, seed)
    ranks, _ = _spawn(1, tmp_path, (cases, prompts, seed))
    assert ranks[0] is not None and "error" not in ranks[0], ranks[0]
    # not bit-equal: the worker runs one BLAS thread, this process several (other rounding)
    for key in cases:
        assert rel_err(ranks[0][key]["logits"], ref["logits"]) < 1e-6, key
    assert ranks[0]["a2a"]["greedy"] == ranks[0]["sync-free"]["greedy"] == ref["greedy"]


@pytest.mark.parametrize("fault", ["die", "stall"])
def test_dead_or_stalled_rank_is_an_error_on_every_rank(tmp_path, fault):
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=random.randrange(2**31), tokenizer=False)
    timeout_s = 3.0
    t0 = time.monotonic()
    ranks, codes = _spawn(2, tmp_path, (str(path), random_prompts(512, [9], 0)), timeout_s=timeout_s, fault=fault,
                          limit=60)
    elapsed = time.monotonic() - t0
    assert "DistributedError: rank 0/2" in ranks[0]["error"], ranks[0]
    assert ranks[0]["seconds"] < timeout_s + 5, "rank 0 waited far past the timeout"
    if fault == "die":
        assert codes[1] == 3 and ranks[1] is None
        assert "died" in ranks[0]["error"] or "did not join" in ranks[0]["error"]
    else:
        assert "did not join in time" in ranks[0]["error"]
        assert "DistributedError: rank 1/2" in ranks[1]["error"], ranks[1]
    assert elapsed < 45


def test_torchrun_multi_node_flags_and_only_rank_0_prints(tmp_path):
    """Two 'nodes' of one process each on this machine, launched the way users launch the official demo."""
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=random.randrange(2**31))
    args = ["--model", str(path), "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--tp", "2", "--ep", "2"]
    alone = LLM(path, backend="cpu").generate(["def add(a, b):"], max_new_tokens=8)[0]
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "60"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    dsv3_run = [str(Path(sys.executable).parent / "dsv3-run")]
    nodes = [subprocess.Popen(torchrun + ["--node-rank", str(n), "--no-python"] + dsv3_run + args, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    outs = [p.communicate(timeout=120) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == "def add(a, b):" + alone + "\n"
    assert outs[1][0] == ""


def test_layout_errors_name_the_problem():
    cfg = ModelConfig.from_hf(CONFIG_2)
    assert layout_problems(cfg, 2, 2, 2) == []
    assert "does not divide the world size 4" in layout_problems(cfg, 4, 3, 1)[0]
    assert any("num_attention_heads = 6 does not split 4 ways" in p for p in layout_problems(cfg, 4, 4, 1))
    assert any("n_routed_experts = 6 does not split 4 ways" in p for p in layout_problems(cfg, 4, 1, 4))
    # FP8: tiny heads of 24 q rows cannot be split on the 128x128 scale grid; CONFIG_FP8's can
    fp8_problems = layout_problems(ModelConfig.from_hf(tiny_config()), 2, 2, 2, "fp8-block")
    assert any("q_b_proj rows" in p and "128x128 FP8 scale blocks" in p for p in fp8_problems)
    assert layout_problems(ModelConfig.from_hf(CONFIG_FP8), 2, 2, 2, "fp8-block") == []
    assert layout_problems(ModelConfig.from_hf(tiny_config()), 2, 2, 2, "dense") == []


def test_parallel_profile_without_torchrun_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=1, tokenizer=False)
    with pytest.raises(ProfileError, match="torchrun --nproc-per-node"):
        LLM(path, profile=with_overrides(load_profile("cpu"), {"parallel.tp": 2}))


def test_mesh_layout_and_wire_format():
    m = Mesh(world=4, rank=3, tp=2, ep=2)
    assert (m.tp_rank, m.moe_tp) == (1, 2)
    assert m.vocab_range(509) == (255, 509)           # ceil split; the last rank holds fewer rows
    assert m.expert_range(12) == (6, 6) and m.expert_inter_range(32) == (16, 32)
    with pytest.raises(ValueError):
        Mesh(world=4, rank=0, tp=3)
    x = torch.randn(5).to(torch.float8_e4m3fn)
    assert wire(x).dtype == torch.uint8 and torch.equal(wire(x).view(torch.float8_e4m3fn).float(), x.float())
