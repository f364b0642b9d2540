"""Every Triton kernel of the cuda and rocm op tables compiles for NVIDIA sm_90 and AMD gfx942 /
gfx950 with `triton.compile` + `GPUTarget`, on this CPU machine (no GPU needed).

Compilation runs in subprocesses (one per target, in parallel) without TRITON_INTERPRET: @triton.jit
decides at import whether a kernel is compiled or interpreted, and tests/conftest.py sets
TRITON_INTERPRET=1 for this pytest process on a machine without a GPU.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = ("cuda:90", "hip:gfx942", "hip:gfx950")
KERNEL_DIR = Path(__file__).resolve().parent.parent / "dsv3" / "backends" / "triton"


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {t: subprocess.Popen([sys.executable, "-m", "dsv3.backends.triton.targets", t, "--json"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in TARGETS}
    out = {}
    for t, p in procs.items():
        stdout, stderr = p.communicate(timeout=900)
        assert stdout.strip(), f"{t}: compile script produced nothing\n{stderr[-3000:]}"
        out[t] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_every_kernel_compiles(results, target):
    rows = results[target]
    failed = [f"{r['kernel']}: {r.get('error')}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    binary = "cubin" if target.startswith("cuda") else "hsaco"
    assert all(r["binary"] == binary and r["bytes"] > 0 for r in rows)


def test_dependent_launch_kernels_wait_first(results):
    """On sm_90 the decode-path kernels are built for programmatic dependent launch: the launch attribute is
    set and the PTX waits on the previous grid; the FP8 GEMM and the router prefetch their weights to L2."""
    rows = [r for r in results["cuda:90"] if r["pdl"]]
    names = {r["fn"] for r in rows}
    assert {"fp8_gemm_kernel", "rms_norm_kernel", "moe_gemm_kernel", "mla_decode_kernel", "moe_gate_kernel"} <= names
    assert all(r["launch_pdl"] and r["grid_wait"] >= 1 for r in rows), [r["kernel"] for r in rows]
    assert all(r["l2_prefetch"] >= 1 for r in rows if r["fn"] in ("fp8_gemm_kernel", "moe_gate_kernel"))
    assert not any(r["pdl"] or r["grid_wait"] for t in TARGETS[1:] for r in results[t])   # AMD: none


def _jit_functions() -> set[str]:
    names = set()
    for path in KERNEL_DIR.glob("*.py"):
        if path.name == "pdl.py":     # device functions the kernels call (wait, L2 prefetch), not kernels
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
                names.add(node.name)
    return names


def test_compile_check_covers_every_kernel(results):
    compiled = {r["fn"] for r in results["cuda:90"]}
    assert _jit_functions() == compiled
