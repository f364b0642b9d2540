"""Our torch_npu calls and the emulation against torch_npu's own schemas (no CANN needed).

The torch_npu 2.13.0 wheel ships torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml, the
schema of every op; tests/ascend_emulation/torch_npu-2.13.0-schemas.txt holds the lines of the ops
we call. Checked: (1) every emulated kernel has exactly the schema's parameters (names, order,
keyword-only split, which have defaults); (2) every call the ascend op table makes passes only
names the schema has, and all required positional arguments. If the wheel itself is at hand
(DSV3_TORCH_NPU_WHEEL, or /tmp/npu/torch_npu-2.13.0-*.whl), (3) the extract matches it.
"""
import glob
import importlib
import inspect
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dsv3.backends.ascend.emulation import install, kernels
from dsv3.core.ops import ExpertWeights, GateSpec
from dsv3.core.quant import quantize_int8_channel
from dsv3.core.weights import QuantWeight

SCHEMAS = Path(__file__).parent / "ascend_emulation" / "torch_npu-2.13.0-schemas.txt"
YAML_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"


def parse(schema: str) -> tuple[str, list[tuple[str, bool, bool]]]:
    """'name(Type a, *, Type b=1) -> ...' -> (name, [(param, keyword_only, has_default)])."""
    name, rest = schema.split("(", 1)
    body = rest.rsplit(") ->", 1)[0]
    params, depth, cur = [], 0, ""
    for ch in body:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
        else:
            cur += ch
    params.append(cur.strip())
    out, kw = [], False
    for p in params:
        if p == "*":
            kw = True
            continue
        decl = p.split("=", 1)[0].split()[-1]
        out.append((decl, kw, "=" in p))
    return name.strip(), out


def schemas() -> dict[str, list[tuple[str, bool, bool]]]:
    lines = [ln for ln in SCHEMAS.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(parse(ln) for ln in lines)


def test_emulation_signatures_equal_the_schemas():
    found = schemas()
    assert len(found) == 8
    for name, params in found.items():
        sig = inspect.signature(getattr(kernels, name))
        ours = [(p.name, p.kind == p.KEYWORD_ONLY, p.default is not p.empty) for p in sig.parameters.values()]
        assert ours == params, f"{name}: emulation {ours} != schema {params}"


def test_op_table_calls_use_schema_names(monkeypatch):
    install(monkeypatch)
    monkeypatch.delitem(sys.modules, "dsv3.backends.ascend.ops", raising=False)
    ops = importlib.import_module("dsv3.backends.ascend.ops")
    kernels.CALL_LOG.clear()
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(6, 64, generator=g).to(bf)
    ops.rms_norm(x, torch.ones(64, dtype=bf), 1e-6)
    ops.add_rms_norm(x, x, torch.ones(64, dtype=bf), 1e-6)
    ops.linear(x, quantize_int8_channel(torch.randn(32, 64, generator=g)))
    ops.moe_gate(x, torch.randn(16, 64, generator=g), torch.zeros(16), GateSpec(2, 4, 2, True, 1.0))
    for fmt in ("int8-w8a8", "dense"):
        ws = []
        for shape in ((4, 32, 64), (4, 32, 64), (4, 64, 32)):
            w = torch.randn(*shape, generator=g) / 8
            if fmt == "dense":
                ws.append(QuantWeight(w.to(bf), None, "dense"))
            else:
                qs = [quantize_int8_channel(m) for m in w]
                ws.append(QuantWeight(torch.stack([q.data for q in qs]), torch.stack([q.scale for q in qs]), fmt))
        ops.moe_experts(x, torch.rand(6, 2), torch.randint(0, 4, (6, 2)), ExpertWeights(*ws))
    cache = torch.randn(2, 128, 576).to(bf)
    ops.mla_decode(torch.randn(1, 32, 512).to(bf), torch.randn(1, 32, 64).to(bf), cache,
                   torch.tensor([[1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 0.1)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    ops.make_mla_prefill()(torch.randn(3, 2, 192).to(bf), torch.randn(3, 2, 192).to(bf), torch.randn(3, 2, 128).to(bf),
                           cu, cu, 0.1)
    found = schemas()
    assert {op for op, _, _ in kernels.CALL_LOG} == set(found), "every schema'd kernel is exercised"
    for op, n_positional, names in kernels.CALL_LOG:
        params = found[op]
        positional = [p for p in params if not p[1]]
        required = [p for p in positional if not p[2]]
        assert len(required) <= n_positional <= len(positional), f"{op}: {n_positional} positional arguments"
        given = {p[0] for p in positional[:n_positional]}
        unknown = set(names) - {p[0] for p in params}
        assert not unknown, f"{op}: keyword(s) {unknown} not in the torch_npu 2.13.0 schema"
        assert not given & set(names), f"{op}: {given & set(names)} passed twice"


def _wheel() -> str | None:
    path = os.environ.get("DSV3_TORCH_NPU_WHEEL")
    if path:
        return path
    found = sorted(glob.glob("/tmp/npu/torch_npu-2.13.0-*.whl"))
    return found[0] if found else None


@pytest.mark.skipif(_wheel() is None, reason="torch_npu 2.13.0 wheel not downloaded (pip download torch-npu==2.13.0 "
                    "--no-deps -d /tmp/npu)")
def test_extract_matches_the_wheel():
    with zipfile.ZipFile(_wheel()) as z:
        yaml = z.read(YAML_IN_WHEEL).decode()
    in_wheel = {}
    for line in yaml.splitlines():
        m = re.search(r"func:\s*(\w+\(.*)$", line)
        if m:
            in_wheel.setdefault(m.group(1).split("(")[0], m.group(1).strip())
    for line in SCHEMAS.read_text().splitlines():
        if line and not line.startswith("#"):
            assert in_wheel[line.split("(")[0]] == line
