"""A model built from the official config.json expects exactly the official checkpoint's tensors."""
import json
import re
from pathlib import Path

import torch

from dsv3.backends.reference.ops import OPS
from dsv3.core.config import ModelConfig
from dsv3.core.loader import expected_tensors
from dsv3.core.model import DeepseekV3
from dsv3.core.ops import Ops

DATA = Path(__file__).parent / "data"


def _inventory() -> dict[str, tuple[list[int], str]]:
    rows = {}
    for line in (DATA / "deepseek-v3-tensor-inventory.tsv").read_text().splitlines():
        if line.startswith("#") or line.startswith("name\t") or not line.strip():
            continue
        pattern, shape, dtype, count = line.split("\t")
        names = [pattern]
        while any("{" in n for n in names):   # expand {a-b} ranges, possibly several per name
            expanded = []
            for n in names:
                m = re.search(r"\{(\d+)-(\d+)\}", n)
                expanded += [n[: m.start()] + str(i) + n[m.end():] for i in range(int(m[1]), int(m[2]) + 1)]
            names = expanded
        assert len(names) == int(count), pattern
        for n in names:
            rows[n] = (json.loads(shape), dtype)
    return rows


def test_meta_model_expects_the_official_tensor_inventory():
    cfg = ModelConfig.from_file(DATA / "deepseek-v3-config.json")
    with torch.device("meta"):
        model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), weight_format="fp8-block", dtype=torch.bfloat16)
    ours = {n: (shape, str(dtype).removeprefix("torch.")) for n, (shape, dtype) in expected_tensors(model).items()}
    official = _inventory()
    assert len(official) == 91_991
    assert sorted(set(official) - set(ours))[:5] == [] and sorted(set(ours) - set(official))[:5] == []
    mismatched = [(n, ours[n], official[n]) for n in official if ours[n] != official[n]]
    assert mismatched == []
    params = sum(torch.Size(s).numel() for s, _ in official.values())
    assert params == 684_531_386_000   # the inventory's stated total, scales included


def test_official_config_values():
    cfg = ModelConfig.from_file(DATA / "deepseek-v3-config.json")
    assert (cfg.latent_dim, cfg.qk_head_dim, cfg.n_group, cfg.topk_group) == (576, 192, 8, 4)
    # softmax scale = 192^-0.5 * (0.1 * 1.0 * ln 40 + 1)^2
    assert abs(cfg.softmax_scale - 192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2) < 1e-9
    assert cfg.quantization.weight_block_size == (128, 128)
