"""The demo model's data and training tools (tools/demo_corpus.py, tools/demo_train_forward.py): the corpus
builder refuses what it must, and the training-only forward is the model's own arithmetic."""
from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import demo_corpus as dc  # noqa: E402
import demo_train_forward as tf  # noqa: E402

MIT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
       "and associated documentation files (the \"Software\"), to deal in the Software without restriction")
GPL = "GNU GENERAL PUBLIC LICENSE Version 3, 29 June 2007"


def make_sdist(path: Path, name: str, license_text: str, classifier: str, files: dict[str, bytes]) -> Path:
    members = {f"{name}-1.0/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                       f"Classifier: License :: OSI Approved :: {classifier}\n".encode(),
               f"{name}-1.0/LICENSE": license_text.encode(),
               **{f"{name}-1.0/{k}": v for k, v in files.items()}}
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tables(tmp_path, sdist: Path, name: str, lic: str, path: str, data: bytes) -> Path:
    data_dir = tmp_path / "data"
    src = dc.Source(name, "1.0", lic, sdist.name, dc.sha256_file(sdist), "LICENSE")
    row = dc.Row("train", hashlib.sha256(data).hexdigest(), len(data), name, "1.0", lic, f"{name}-1.0/{path}")
    dc.write_tables(data_dir, [src], [row])
    return data_dir


def test_corpus_reads_a_verified_package(tmp_path):
    code = b"def f(x):\n    return x + 1\n"
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", "pkg", MIT, "MIT License", {"pkg/a.py": code})
    data_dir = tables(tmp_path, sdist, "pkg", "MIT", "pkg/a.py", code)
    out = dc.read_corpus(data_dir, tmp_path, None, fetch=False)
    assert [text for _, text in out["train"]] == [code.decode()]


def test_corpus_refuses_a_file_whose_hash_differs(tmp_path):
    code = b"def f(x):\n    return x + 1\n"
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", "pkg", MIT, "MIT License", {"pkg/a.py": code})
    data_dir = tables(tmp_path, sdist, "pkg", "MIT", "pkg/a.py", b"def f(x):\n    return x - 1\n")
    with pytest.raises(dc.CorpusError, match="differ"):
        dc.read_corpus(data_dir, tmp_path, None, fetch=False)


def test_corpus_refuses_an_sdist_whose_hash_differs(tmp_path):
    code = b"x = 1\n"
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", "pkg", MIT, "MIT License", {"pkg/a.py": code})
    data_dir = tables(tmp_path, sdist, "pkg", "MIT", "pkg/a.py", code)
    make_sdist(sdist, "pkg", MIT, "MIT License", {"pkg/a.py": code, "pkg/b.py": b"y = 2\n"})   # replaced upstream
    with pytest.raises(dc.CorpusError, match="sha256"):
        dc.read_corpus(data_dir, tmp_path, None, fetch=False)


def test_corpus_refuses_a_package_without_an_allowed_license(tmp_path):
    code = b"x = 1\n"
    sdist = make_sdist(tmp_path / "gpl-1.0.tar.gz", "gpl", GPL, "GNU General Public License v3 (GPLv3)",
                       {"gpl/a.py": code})
    data_dir = tables(tmp_path, sdist, "gpl", "MIT", "gpl/a.py", code)     # a manifest that claims MIT
    with pytest.raises(dc.CorpusError, match="license"):
        dc.read_corpus(data_dir, tmp_path, None, fetch=False)
    with pytest.raises(dc.CorpusError, match="copyleft"):
        dc.check_license("gpl", "Classifier: License :: OSI Approved :: MIT License\n", {"gpl-1.0/LICENSE": GPL})
    with pytest.raises(dc.CorpusError, match="metadata"):    # MIT text, metadata says Apache
        dc.check_license("x", "License-Expression: Apache-2.0\n", {"x-1.0/LICENSE": MIT})
    with pytest.raises(dc.CorpusError, match="no LICENSE"):
        dc.check_license("x", "License-Expression: MIT\n", {})
    assert dc.check_license("x", "License-Expression: MIT\n", {"x-1.0/LICENSE": MIT}) == "MIT"


def test_dedup_drops_copies_and_keeps_heldout_files_out_of_training():
    body = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(20))
    held = next(f"m{i}.py" for i in range(10_000) if dc.heldout("cpython", f"m{i}.py"))
    train = next(f"t{i}.py" for i in range(10_000) if not dc.heldout("cpython", f"t{i}.py"))
    files = [("cpython", train, body.encode()),                       # a copy of the held-out file, listed first
             ("cpython", held, body.encode()),
             ("cpython", "near.py", (body + "# one more line here\n").encode()),
             ("cpython", "other.py", b"import os\nprint(os.getcwd())\n")]
    keep, dropped = dc.deduplicate(files)
    assert keep == [1, 3] and dropped == {"exact": 1, "near": 1}


def test_generated_and_minified_files_are_filtered():
    assert dc.keep_file("a.py", b"# Generated by the protocol buffer compiler.  DO NOT EDIT!\nx = 1\n") == "generated"
    assert dc.keep_file("a.py", b"x = [" + b"1, " * 600 + b"]\n") == "long lines"
    assert dc.keep_file("pkg/_vendor/six.py", b"x = 1\n") == "vendored or build directory"
    assert dc.keep_file("pkg/a.py", b"x = 1\n") is None


def test_training_forward_is_the_models_forward():
    from dsv3.backends.reference.ops import OPS
    from dsv3.checkpoints.synthetic import TINY_CONFIG
    from dsv3.core.batch import Batch, Chunk
    from dsv3.core.config import ModelConfig
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(dict(TINY_CONFIG))
    model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "dense", torch.float32)
    for name, p in model.named_parameters():
        p.data.copy_(torch.randn(p.shape) * (0.3 if p.dim() == 1 else 0.1) + (1.0 if name.endswith("norm.weight") else 0))
    model.prepare_weights()
    seqs = [[0] + torch.randint(2, cfg.vocab_size, (n,)).tolist() for n in (11, 6, 20)]

    # the model's own forward (the flat batch of the inference path), one sequence at a time
    want_main, want_mtp = [], []
    for s in seqs:
        caches = [torch.zeros(1, 64, cfg.latent_dim) for _ in range(model.num_cache_layers)]
        batch = Batch.build([Chunk(s, 0, [0])], 64, "cpu")
        hidden = model(batch, caches)
        want_main.append(model.logits(hidden))
        mtp_batch = Batch.build([Chunk(s[1:], 0, [0])], 64, "cpu")
        want_mtp.append(model.mtp.logits(model.mtp_hidden(mtp_batch.input_ids, hidden[:-1], mtp_batch, caches)))

    # packed: rows of 24 slots, the first two segments in one row, the third alone
    rows = [[0, 1], [2]]
    ids = torch.zeros(2, 24, dtype=torch.long)
    pos = torch.zeros(2, 24, dtype=torch.long)
    seg = torch.full((2, 24), -1, dtype=torch.long)
    where = {}
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            n = len(seqs[k])
            ids[r, at:at + n] = torch.tensor(seqs[k])
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = k
            where[k] = (r, at, n)
            at += n
    with torch.no_grad():
        hidden, mtp_hidden = tf.forward(model, ids, pos, seg)
        main = model.logits(hidden.flatten(0, 1)).view(2, 24, -1)
        mtp = model.mtp.logits(mtp_hidden.flatten(0, 1)).view(2, 24, -1)
    for k, (r, at, n) in where.items():
        torch.testing.assert_close(main[r, at:at + n], want_main[k], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mtp[r, at:at + n - 1], want_mtp[k], atol=2e-5, rtol=1e-4)

    # the losses: targets stay inside each segment
    main_t, mtp_t = tf.targets(ids, seg)
    r, at, n = where[0]
    assert main_t[r, at:at + n - 1].tolist() == seqs[0][1:] and main_t[r, at + n - 1] == -100
    assert mtp_t[r, at:at + n - 2].tolist() == seqs[0][2:] and (mtp_t[r, at + n - 2:at + n] == -100).all()
    assert (main_t[seg < 0] == -100).all()


def test_code_under_its_own_license_file_takes_that_license_or_is_refused(tmp_path):
    members = {"pkg-1.0/LICENSE": MIT.encode(), "pkg-1.0/pkg/_gpl/LICENSE": GPL.encode(),
               "pkg-1.0/pkg/blib/LICENSE": b"PSF LICENSE AGREEMENT FOR PYTHON", "pkg-1.0/docs/license.rst": b"x"}
    assert dc.nested_licenses(members) == {"pkg-1.0/pkg/_gpl/": None, "pkg-1.0/pkg/blib/": "PSF-2.0"}
    code = b"x = 1\n"
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", "pkg", MIT, "MIT License", {"pkg/a.py": code})
    data_dir = tables(tmp_path, sdist, "pkg", "MIT", "pkg/a.py", code)
    sources, rows = dc.read_tables(data_dir)
    dc.write_tables(data_dir, sources, [dc.Row(**{**rows[0].__dict__, "license": "GPL-3.0"})])
    with pytest.raises(dc.CorpusError, match="GPL-3.0"):
        dc.read_corpus(data_dir, tmp_path, None, fetch=False)
