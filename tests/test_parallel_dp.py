"""Data-parallel attention with expert-parallel MoE on the CPU with gloo (issue 23).

Each data-parallel group (tp ranks) generates its own share of the prompts with its own scheduler and
latent cache; the groups meet only in the MoE layers. The oracle is one process on the same checkpoint:
greedy and seeded sampled tokens identical, logits within 1e-5 (fp32), MTP speculation equal to plain
greedy. Prompt counts per group are uneven, and some groups run out of sequences (or never have one)
while others still step, so they join the others' MoE layers with zero rows. Fresh random weights.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from dsv3 import LLM
from dsv3.core.config import ModelConfig
from dsv3.core.errors import ProfileError
from dsv3.core.layout import Mesh
from dsv3.core.profile import load_profile, with_overrides
from dsv3.parallel.sharding import layout_problems

from helpers import make_checkpoint, random_prompts, rel_err, tiny_config
from test_parallel import ALL_TO_ALL, CONFIG_2, CONFIG_4, SYNC_FREE, _env, _free_port
from test_parallel import _spawn as spawn_ranks

LENGTHS = [37, 5, 20, 9, 3]               # 5 prompts: 2 on one group and 3 on the other at dp = 2
NEW = 9
BLOCK = 4                                 # small cache blocks: the prompts fill some, so the prefix cache hits


def _profile(tp: int, ep: int, dp: int, **more):
    return with_overrides(load_profile("cpu"), {"parallel.tp": tp, "parallel.ep": ep, "parallel.dp": dp,
                                                "kv_cache.block_size": BLOCK, **more})


def _generate(llm, prompts, **params):
    return llm.generate_ids(prompts, **{"max_new_tokens": NEW, "ignore_eos": True, **params})[0]


def _run_case(path, tp, ep, dp, sync_free, prompts, seed, stop_id):
    llm = LLM(path, profile=_profile(tp, ep, dp))
    llm.mesh.comm.sync_free_max_tokens = sync_free
    out = {"mesh": (llm.mesh.world, llm.mesh.tp, llm.mesh.ep, llm.mesh.dp, llm.mesh.dp_rank)}
    out["greedy"] = _generate(llm, prompts)
    out["sampled"] = _generate(llm, prompts, temperature=1.0, seed=seed)
    out["one_prompt"] = _generate(llm, prompts[:1], max_new_tokens=7)   # the other groups have nothing
    # a stop token some sequences meet early: groups finish after different numbers of steps
    out["stopped"] = _generate(llm, prompts, stop_token_ids=[stop_id])
    out["logits"] = llm.logits(prompts)
    out["mine"] = llm._group_share(prompts, 1, NEW)
    # prefix caching: the same prompts again reuse this group's cached blocks
    before = llm.engine.stats.prefix_cached_tokens
    out["again"] = _generate(llm, prompts)
    out["prefix_hits"] = llm.engine.stats.prefix_cached_tokens - before
    out["steps"] = llm.engine.stats.steps
    return out


def _run_mtp(path, tp, ep, dp, prompts):
    llm = LLM(path, profile=_profile(tp, ep, dp, **{"speculative.method": "mtp", "speculative.num_draft_tokens": 1,
                                                   "speculative.policy": "always"}))
    llm.mesh.comm.sync_free_max_tokens = ALL_TO_ALL
    ids, _ = llm.generate_ids(prompts, max_new_tokens=8, ignore_eos=True)
    return {"greedy": ids, "drafts": sum(llm.engine.stats.spec.proposed)}


def _worker(rank, world, port, job, out_dir, timeout_s, fault=None):
    os.environ.update(_env(rank, world, port, timeout_s))
    torch.set_num_threads(1)
    result = {}
    try:
        kind, cases, prompts, seed, stop_id = job
        if kind == "die":
            llm = LLM(cases, profile=_profile(1, world, world))
            if rank == 1:
                os._exit(3)
            t0 = time.monotonic()
            try:
                llm.generate_ids(prompts, max_new_tokens=4, ignore_eos=True)
            finally:
                result["seconds"] = time.monotonic() - t0
        for key, (path, tp, ep, dp, sync_free) in cases.items():
            result[key] = (_run_mtp(path, tp, ep, dp, prompts) if key.startswith("mtp")
                           else _run_case(path, tp, ep, dp, sync_free, prompts, seed, stop_id))
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(e).__name__}: {e}"
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawn(world, tmp_path, job, timeout_s=60.0, limit=240):
    return spawn_ranks(world, tmp_path, job, timeout_s=timeout_s, limit=limit, worker=_worker)


def _single(path, prompts, seed):
    """The oracle, and a stop token that ends the first sequence after 2 tokens (the others later or not)."""
    llm = LLM(path, backend="cpu")
    ref = {"greedy": _generate(llm, prompts), "sampled": _generate(llm, prompts, temperature=1.0, seed=seed),
           "one_prompt": _generate(llm, prompts[:1], max_new_tokens=7), "logits": llm.logits(prompts)}
    ref["stop_id"] = ref["greedy"][0][1]
    ref["stopped"] = _generate(llm, prompts, stop_token_ids=[ref["stop_id"]])
    assert len({len(t) for t in ref["stopped"]}) > 1, "the stop token should end sequences at different steps"
    return ref


def _check(ranks, cases, ref, n_prompts):
    for r, res in enumerate(ranks):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}"
    for key, (_, tp, _, dp, _) in cases.items():
        if key.startswith("mtp"):
            continue
        got = [res[key] for res in ranks]
        for r, g in enumerate(got):
            assert g["greedy"] == ref["greedy"], f"{key} rank {r}: greedy tokens differ from one process"
            assert g["again"] == ref["greedy"], f"{key} rank {r}: the repeat (prefix cache) differs"
            assert g["sampled"] == ref["sampled"], f"{key} rank {r}: seeded sampling differs from one process"
            assert g["one_prompt"] == ref["one_prompt"], f"{key} rank {r}: a lone prompt (other groups idle)"
            assert g["stopped"] == ref["stopped"], f"{key} rank {r}: sequences that stop at different steps"
            err = rel_err(g["logits"], ref["logits"])
            assert err < 1e-5, f"{key} rank {r}: logits relative error {err:.2e}"
            assert g["mesh"][3] == dp and g["mesh"][4] == r // tp
        # every prompt generated by exactly one group, every group got some (uneven: 5 prompts)
        shares = [g["mine"] for g in got[::tp]]
        assert sorted(i for s in shares for i in s) == list(range(n_prompts)), (key, shares)
        assert all(shares) and len({len(s) for s in shares}) > 1, (key, shares)
        # tp ranks of one group run one schedule; each group that had prompts hit its own prefix cache
        for r in range(len(got)):
            assert got[r]["steps"] == got[r - r % tp]["steps"], f"{key}: rank {r} stepped apart from its group"
        assert all(g["prefix_hits"] > 0 for g in got), (key, [g["prefix_hits"] for g in got])


@pytest.fixture(scope="module")
def seed():
    return random.randrange(2**31)


def test_two_processes_dp2_both_moe_paths_and_mtp(tmp_path, seed):
    dense, _ = make_checkpoint(tmp_path / "dense", CONFIG_2, seed=seed)
    prompts = random_prompts(509, LENGTHS, seed)
    cases = {f"dp2-{name}": (str(dense), 1, 2, 2, path) for name, path in (("a2a", ALL_TO_ALL), ("sync-free", SYNC_FREE))}
    cases["mtp-dp2"] = (str(dense), 1, 2, 2, ALL_TO_ALL)
    ref = _single(dense, prompts, seed)
    ranks, _ = _spawn(2, tmp_path, ("cases", cases, prompts, seed, ref["stop_id"]))
    _check(ranks, cases, ref, len(prompts))
    plain = LLM(dense, backend="cpu").generate_ids(prompts, max_new_tokens=8, ignore_eos=True)[0]
    for r in range(2):   # MTP under dp: the engine's own drafts, verified, equal plain greedy decoding
        assert ranks[r]["mtp-dp2"]["greedy"] == plain, f"rank {r}: MTP under dp differs from plain greedy"
        assert ranks[r]["mtp-dp2"]["drafts"] > 0


def test_four_processes_dp_and_dp_x_tp(tmp_path, seed):
    path, _ = make_checkpoint(tmp_path / "ckpt", CONFIG_4, seed=seed, num_shards=2)
    prompts = random_prompts(509, LENGTHS, seed + 7)
    cases = {"dp4-ep4-a2a": (str(path), 1, 4, 4, ALL_TO_ALL),      # attention whole on every rank, 4 groups
             "dp4-ep4-sync-free": (str(path), 1, 4, 4, SYNC_FREE),
             "dp2-tp2-ep4-a2a": (str(path), 2, 4, 2, ALL_TO_ALL),  # 2 groups of 2: heads split inside a group
             "dp2-tp2-ep2-sync-free": (str(path), 2, 2, 2, SYNC_FREE)}   # each expert split 2 ways as well
    ref = _single(path, prompts, seed)
    ranks, _ = _spawn(4, tmp_path, ("cases", cases, prompts, seed, ref["stop_id"]))
    _check(ranks, cases, ref, len(prompts))
    assert ranks[3]["dp2-tp2-ep4-a2a"]["mesh"] == (4, 2, 4, 2, 1)


def test_dead_rank_under_dp_is_an_error(tmp_path):
    path, _ = make_checkpoint(tmp_path / "ckpt", CONFIG_2, seed=random.randrange(2**31), tokenizer=False)
    ranks, codes = _spawn(2, tmp_path, ("die", str(path), random_prompts(509, [9, 4], 0), 0, 0), timeout_s=3.0,
                          limit=60)
    assert codes[1] == 3 and ranks[1] is None
    assert "DistributedError: rank 0/2" in ranks[0]["error"], ranks[0]
    assert ranks[0]["seconds"] < 10


def test_dp_layout_rules():
    cfg = ModelConfig.from_hf(CONFIG_4)
    assert layout_problems(cfg, 4, 1, 4, dp=4) == []
    assert layout_problems(cfg, 4, 2, 4, dp=2) == []
    assert any("dp = 3 x parallel.tp = 1 must equal the world size 4" in p for p in layout_problems(cfg, 4, 1, 4, dp=3))
    with pytest.raises(ValueError, match="dp=2 x tp=1 must equal the world size 4"):
        Mesh(4, 0, 1, 4, 2)
    m = Mesh(4, 3, 2, 4, 2)
    assert (m.dp_rank, m.tp_rank, m.data_parallel) == (1, 1, True)


def test_dp_without_torchrun_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=1, tokenizer=False)
    with pytest.raises(ProfileError, match="dp: 2.*torchrun --nproc-per-node"):
        LLM(path, profile=_profile(1, 1, 2))



def test_cli_input_file_under_torchrun_with_dp(tmp_path):
    """`torchrun ... dsv3-run --input-file prompts.txt --dp 2`: the prompts split over the two groups, rank 0
    prints every completion in order, as one process prints them; rank 1 prints nothing."""
    import subprocess
    import sys
    path, _ = make_checkpoint(tmp_path / "ckpt", CONFIG_2, seed=random.randrange(2**31))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nhello world\nimport os\n")
    args = ["--model", str(path), "--input-file", str(prompts), "--max-new-tokens", "6"]
    dsv3_run = str(Path(sys.executable).parent / "dsv3-run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "60"}
    alone = subprocess.run([dsv3_run, *args], env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr[-2000:]
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "--log-dir", str(logs), "--tee", "1", "--no-python", dsv3_run, *args, "--dp", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(alone.stdout.split("\n")) == 4                 # 3 lines (form feeds and the like are not line ends)
    rank0, rank1 = (next(logs.rglob(f"attempt_0/{r}/stdout.log")).read_text() for r in (0, 1))
    assert rank0 == alone.stdout and rank1 == ""
