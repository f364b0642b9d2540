"""Train the embedded demo model: a small DeepSeek-V3 on Python sources (the CPython standard library and
permissively licensed PyPI packages).

The architecture is the project's own (dsv3.core.model): MLA with q and kv low-rank projections, one dense
first layer, DeepSeekMoE with 64 fine-grained routed experts under group-limited sigmoid routing (noaux_tc)
and a shared expert, YaRN RoPE, and one MTP module trained with the paper's joint objective
L = L_main + lambda * L_MTP. Routing is balanced the auxiliary-loss-free way: after each step every gate's
e_score_correction_bias moves by gamma * sign(mean load - expert load). The step runs the model's
parameters through tools/demo_train_forward.py (the same arithmetic as the model's forward, checked
against it in tests/test_demo_corpus.py, written for autograd: packed rows, SDPA, batched experts) in
bf16 with float32 master weights.

Stages (the GPU only for `train`):

    python tools/train_demo.py manifest    # once: sdists in build/sdists -> data/demo_corpus/{SOURCES,MANIFEST}.tsv
    python tools/train_demo.py corpus      # here: verified files -> tokenizer + packed tokens in build/demo_corpus
    python tools/train_demo.py train --out DIR [--time-budget S]   # GPU: FP8 checkpoint shards + loss log in DIR
    python tools/train_demo.py export --weights DIR               # here: DIR -> dsv3/demo_model
    python tools/train_demo.py speed [--config NAME]              # here: CPU decode speed of random weights

Reproducible: `corpus` rebuilds the exact file list of the manifest (sdists pinned by version and sha256,
every file by sha256; it refuses anything else); the tokenizer is trained on the train split; every
hyper-parameter is in this file (HPARAMS, DEMO_CONFIG); the seed fixes initialisation and data order. The
step count is fixed after timing the first steps against the time budget (recorded in the log), and
`--steps N` replays a recorded count. GPU kernels (index_add_, scatter in backward) are not bitwise
deterministic, so a rerun follows the loss curve closely, not to the last bit.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import demo_corpus  # noqa: E402
import demo_train_forward as tf  # noqa: E402
from dsv3.backends.reference.ops import OPS  # noqa: E402
from dsv3.core.config import ModelConfig  # noqa: E402
from dsv3.core.model import DeepseekV3, Gate  # noqa: E402
from dsv3.core.ops import Ops  # noqa: E402

DATA_DIR = REPO / "data" / "demo_corpus"
SDIST_DIR = REPO / "build" / "sdists"
CORPUS_DIR = REPO / "build" / "demo_corpus"          # ignored by git; carried to the device
DEMO_DIR = REPO / "dsv3" / "demo_model"
T_START = time.time()

# The PyPI packages of the corpus, in priority order (an earlier source keeps a file that a later one
# duplicates). Each must pass demo_corpus.check_license: MIT, BSD, Apache-2.0 or PSF in its metadata AND
# its LICENSE files; `manifest` drops (and says so) any that does not.
PACKAGES = [
    "requests", "urllib3", "idna", "attrs", "click", "flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous",
    "packaging", "pyparsing", "python-dateutil", "pytz", "toml", "tomli", "more-itertools", "boltons",
    "sortedcontainers", "networkx", "sympy", "mpmath", "setuptools", "pytest", "pluggy", "black", "rich",
    "pygments", "sqlalchemy", "tornado", "twisted", "django", "sphinx", "babel", "typing_extensions", "httpx",
    "httpcore", "h11", "anyio", "starlette", "fastapi", "uvicorn", "mypy", "jedi", "parso", "ipython",
    "prompt_toolkit", "traitlets", "pyyaml", "markdown", "wheel", "cachetools", "decorator", "isort", "flake8",
    "pycodestyle", "pyflakes", "coverage", "marshmallow", "sqlparse", "pyasn1", "rsa", "botocore",
    "beautifulsoup4", "celery", "kombu", "scrapy",
]

DEMO_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 4096, "hidden_size": 384, "intermediate_size": 1024, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 6, "num_key_value_heads": 6,
    "q_lora_rank": 192, "kv_lora_rank": 128, "qk_nope_head_dim": 48, "qk_rope_head_dim": 16, "v_head_dim": 64,
    "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False, "initializer_range": 0.02,
}
# what `speed` compares (decode cost on the CPU); "demo" is DEMO_CONFIG, "v1" the model shipped before
CONFIGS = {
    "demo": {},
    "v1": {"hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 192, "q_lora_rank": 128,
           "kv_lora_rank": 64, "qk_nope_head_dim": 32, "v_head_dim": 32, "num_attention_heads": 8,
           "num_key_value_heads": 8, "n_routed_experts": 16, "n_group": 4, "topk_group": 2},
    "demo-5-layers": {"num_hidden_layers": 5, "n_routed_experts": 48},
}

HPARAMS = {
    "seed": 0,
    "seq_len": 512,            # slots per packed row; every segment starts with BOS at position 0
    "batch_rows": 128,         # rows per step (64k token slots)
    "lr": 2e-3, "min_lr_ratio": 0.1, "warmup_steps": 200, "betas": (0.9, 0.95), "weight_decay": 0.1,
    "grad_clip": 1.0,
    "mtp_lambda": 0.3,         # DeepSeek-V3's lambda for the first 10T tokens
    "bias_update_speed": 1e-3,  # gamma of the auxiliary-loss-free balancing (the paper's value)
    "init_std": 0.02,
    "eval_every": 250, "eval_rows": 64, "log_every": 25,
    "time_budget_s": 400,      # training loop, compile included; --steps 0 fixes the step count from the probe
    "deadline_s": 510,         # from process start: stop, evaluate and save whatever the step count says
    "checkpoint_every_s": 150,
    "max_epochs": 6,           # a cap on the time-fitted step count (the corpus is 42.8 M tokens)
    "probe_steps": (10, 40),   # steps timed to fix the step count (after compile warm-up)
    "tokenizer_vocab": 4096,
    "compile": True,
}
CHECKPOINT_SHARD_BYTES = 15 << 20   # the device returns at most 8 files of at most 16 MiB each (64 MiB in all)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------------------------------------------
# corpus
def manifest(args) -> None:
    stdlib = Path(args.stdlib) if args.stdlib else stdlib_dir()
    sources, rows = demo_corpus.scan(PACKAGES, SDIST_DIR, stdlib, "3.11.7")
    demo_corpus.write_tables(DATA_DIR, sources, rows)
    lic_dir = DATA_DIR / "licenses"
    shutil.rmtree(lic_dir, ignore_errors=True)
    lic_dir.mkdir(parents=True)
    for s in sources[1:]:
        members = demo_corpus.archive_members(SDIST_DIR / s.sdist)
        for member in s.license_files.split(","):
            (lic_dir / f"{s.name}-{s.version}-{member.split('/')[-1]}.txt").write_bytes(members[member])
    shutil.copyfile(stdlib / "LICENSE.txt", DATA_DIR / "LICENSE-PSF.txt")
    for split in ("train", "heldout"):
        rs = [r for r in rows if r.split == split]
        print(f"{split}: {len(rs)} files, {sum(r.size for r in rs) / 1e6:.1f} MB")
    print(f"wrote {DATA_DIR}/SOURCES.tsv ({len(sources)} sources), MANIFEST.tsv ({len(rows)} files), licenses/")


def pack_rows(segments: list[list[int]], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: segment indices per row of `seq_len` slots (few slots left empty)."""
    order = sorted(range(len(segments)), key=lambda i: -len(segments[i]))
    rows, free = [], {}              # free slots -> rows with exactly that many free
    for i in order:
        n = len(segments[i])
        fit = next((f for f in range(n, seq_len + 1) if free.get(f)), None)
        if fit is None:
            rows.append([i])
            r, left = len(rows) - 1, seq_len - n
        else:
            r = free[fit].pop()
            rows[r].append(i)
            left = fit - n
        if left >= 3:
            free.setdefault(left, []).append(r)
    return rows


def encode_split(tok_dir: Path, texts: list[str], seq_len: int) -> list[list[int]]:
    from tokenizers import Tokenizer as HFTokenizer
    from dsv3.commands.eval import document_segments
    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    segs = []
    for i in range(0, len(texts), 512):
        for enc in hf.encode_batch(texts[i:i + 512], add_special_tokens=False):
            segs += [s for s in document_segments(enc.ids, seq_len, 0, 1) if len(s) >= 3]
    return segs


def save_rows(path: Path, segs: list[list[int]], seq_len: int) -> tuple[int, int]:
    """Segments packed into rows (pack_rows), saved xz-compressed: ids int16 [R, seq_len] and the segment
    index of each slot int8 (-1: empty). Returns (rows, used slots)."""
    from safetensors.torch import save
    rows = pack_rows(segs, seq_len)
    ids = torch.ones(len(rows), seq_len, dtype=torch.int16)
    seg = torch.full((len(rows), seq_len), -1, dtype=torch.int8)
    for r, members in enumerate(rows):
        at = 0
        for j, i in enumerate(members):
            n = len(segs[i])
            ids[r, at:at + n] = torch.tensor(segs[i], dtype=torch.int16)
            seg[r, at:at + n] = j
            at += n
    path.write_bytes(lzma.compress(save({"ids": ids, "segments": seg}), preset=6))
    return len(rows), int((seg >= 0).sum())


def load_rows(split: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, segments) [R, seq_len] int32 on `device`; a slot's position counts from its
    segment's first slot (the segment's BOS at position 0)."""
    from safetensors.torch import load
    d = load(lzma.decompress((CORPUS_DIR / f"{split}.rows.safetensors.xz").read_bytes()))
    ids, seg = d["ids"].to(device).int(), d["segments"].to(device).int()
    slot = torch.arange(ids.shape[1], device=device).expand_as(ids)
    starts = torch.cat((torch.ones_like(seg[:, :1], dtype=torch.bool), seg[:, 1:] != seg[:, :-1]), dim=1)
    first = torch.where(starts, slot, torch.zeros_like(slot)).cummax(dim=1).values
    return ids, (slot - first).int(), seg


def corpus(args) -> None:
    from dsv3.checkpoints.synthetic import write_tokenizer
    stdlib = Path(args.stdlib) if args.stdlib else stdlib_dir()
    t0 = time.time()
    files = demo_corpus.read_corpus(DATA_DIR, SDIST_DIR, stdlib, fetch=not args.offline)
    print(f"read and verified {sum(map(len, files.values()))} files in {time.time() - t0:.0f} s", flush=True)
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    tok_dir = CORPUS_DIR / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    t0 = time.time()
    write_tokenizer(tok_dir, HPARAMS["tokenizer_vocab"], [text for _, text in files["train"]])
    print(f"tokenizer: {HPARAMS['tokenizer_vocab']} tokens in {time.time() - t0:.0f} s", flush=True)
    # the stdlib's held-out files are scored apart (they are what `dsv3-run eval` scores by default)
    parts = {"train": files["train"],
             "heldout": [(r, t) for r, t in files["heldout"] if r.source == "cpython"],
             "heldout_packages": [(r, t) for r, t in files["heldout"] if r.source != "cpython"]}
    for split, part in parts.items():
        texts = [text for _, text in part]
        segs = encode_split(tok_dir, texts, HPARAMS["seq_len"])
        n_rows, used = save_rows(CORPUS_DIR / f"{split}.rows.safetensors.xz", segs, HPARAMS["seq_len"])
        n = sum(map(len, segs))
        print(f"{split}: {len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} MB text, {len(segs)} segments, "
              f"{n / 1e6:.2f} M tokens ({sum(map(len, texts)) / n:.2f} bytes/token), {n_rows} rows of "
              f"{HPARAMS['seq_len']} ({used / (n_rows * HPARAMS['seq_len']):.1%} of slots used)", flush=True)
    sums = [f"{demo_corpus.sha256_file(f)}  {f.relative_to(CORPUS_DIR)}" for f in
            sorted(CORPUS_DIR.glob("*.rows.safetensors.xz")) + [tok_dir / "tokenizer.json"]]
    (CORPUS_DIR / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print("\n".join(sums))
    # the stdlib's held-out files ship as dsv3/demo_model/heldout.jsonl; the packages' stay in build/
    for name, keep in (("heldout.jsonl", lambda r: r.source == "cpython"),
                       ("heldout_packages.jsonl", lambda r: r.source != "cpython")):
        with open(CORPUS_DIR / name, "w") as f:
            for r, text in files["heldout"]:
                if keep(r):
                    f.write(json.dumps({"path": r.path, "text": text}) + "\n")


# ---------------------------------------------------------------------------------------------------
# model
def build_model(cfg: ModelConfig, device, seed: int, std: float) -> DeepseekV3:
    model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "dense", torch.float32)
    g = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * (cfg.num_hidden_layers + 1))
    for name, p in model.named_parameters():      # initialised on the CPU: the same numbers on any device
        if p.dim() == 1:
            p.data.copy_(torch.zeros_like(p) if name.endswith("e_score_correction_bias") else torch.ones_like(p))
        else:
            scale = depth_scale if re.search(r"(o_proj|down_proj)\.weight$", name) else 1.0
            p.data.copy_(torch.randn(p.shape, generator=g) * std * scale)
    # The paper's MTP module shares the main model's embedding and output head; the checkpoint
    # stores them again under the MTP layer, so export writes the shared tensors twice.
    model.mtp.embed_tokens.weight = model.model.embed_tokens.weight
    model.mtp.shared_head.head.weight = model.lm_head.weight
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("e_score_correction_bias"))
    return model.to(device)


def mtp_shared(cfg: ModelConfig) -> dict[str, str]:
    """MTP tensors that are the main model's (the paper shares them; the checkpoint repeats them)."""
    n = cfg.num_hidden_layers
    return {f"model.layers.{n}.embed_tokens.weight": "model.embed_tokens.weight",
            f"model.layers.{n}.shared_head.head.weight": "lm_head.weight"}


def checkpoint_tensors(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Official layout names (experts unstacked), float32 on the CPU, with the shared MTP copies."""
    out = {}
    for name, p in model.state_dict(keep_vars=False).items():
        p = p.detach().float().cpu()
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(.+)$", name)
        if m:
            for e in range(p.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3)}"] = p[e].clone()
        else:
            out[name] = p.clone()
    for copy, original in mtp_shared(model.cfg).items():
        out[copy] = out[original].clone()
    return out


def save_fp8_shards(model: DeepseekV3, path: Path) -> float:
    """The shipped format (FP8 projections, bf16 rest) as shards of <= 15 MiB; returns MB written."""
    from safetensors.torch import save_file
    from dsv3.checkpoints.synthetic import to_checkpoint_format
    tensors = to_checkpoint_format(checkpoint_tensors(model), "fp8-block", torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        if cur and size + t.numel() * t.element_size() > CHECKPOINT_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t.contiguous(), size + t.numel() * t.element_size()
    shards.append(cur)
    for i, shard in enumerate(shards):
        save_file(shard, str(tmp / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    # shards only (the device returns at most 8 files): export writes config.json from run.json's config
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return sum(f.stat().st_size for f in path.iterdir()) / 1e6


# ---------------------------------------------------------------------------------------------------
# training
def lr_at(step: int, total: int, hp: dict) -> float:
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    progress = min(1.0, (step - hp["warmup_steps"]) / max(1, total - hp["warmup_steps"]))
    return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(loss_fn, model, data, batch=16) -> tuple[float, float]:
    """Token-weighted (main, MTP) cross-entropy over the held-out rows."""
    ids, pos, seg = data
    tot = [0.0, 0.0]
    count = [0, 0]
    for i in range(0, ids.shape[0], batch):
        b = (ids[i:i + batch].long(), pos[i:i + batch].long(), seg[i:i + batch].long())
        main, mtp = loss_fn(model, *b)
        main_t, mtp_t = tf.targets(b[0], b[2])
        for k, (v, t) in enumerate(((main, main_t), (mtp, mtp_t))):
            n = int((t != -100).sum())
            tot[k] += float(v) * n
            count[k] += n
    return tot[0] / max(1, count[0]), tot[1] / max(1, count[1])


@torch.no_grad()
def fp8_roundtrip_(model: DeepseekV3) -> None:
    """Replace every projection the checkpoint stores in FP8 by its dequantised FP8 value, in place."""
    from dsv3.checkpoints.synthetic import quantizable
    from dsv3.core.quant import quantize_fp8_block
    from dsv3.core.weights import dequantize
    for name, p in model.named_parameters():
        probe = re.sub(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight$", r".mlp.experts.0.\1.weight", name)
        if not quantizable(probe):
            continue
        w = p.data.float()
        flat = w.view(-1, *w.shape[-2:])
        for e in range(flat.shape[0]):
            flat[e] = dequantize(quantize_fp8_block(flat[e]))
        p.data.copy_(w)


def train(args) -> None:
    hp = dict(HPARAMS)
    for key in ("batch_rows", "time_budget_s", "deadline_s", "checkpoint_every_s"):
        if getattr(args, key, None):
            hp[key] = getattr(args, key)
    if args.no_compile:
        hp["compile"] = False
    config = dict(DEMO_CONFIG, **CONFIGS.get(args.config, {}))
    if args.tiny:
        config.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2,
                      num_key_value_heads=2, n_routed_experts=16, n_group=4, topk_group=2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(hp["seed"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    cfg = ModelConfig.from_hf(config)
    model = build_model(cfg, device, hp["seed"], hp["init_std"])
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp["lr"], betas=hp["betas"],
                            fused=device.type == "cuda")
    n_params = sum(p.numel() for p in params)

    t0 = time.time()
    train_data, held = load_rows("train", device), load_rows("heldout", device)
    held_packages = load_rows("heldout_packages", device)
    if device.type == "cpu":          # a smoke test: score the final weights on the periodic slice only
        held = held_eval = tuple(t[: hp["eval_rows"]] for t in held)
        held_packages = tuple(t[: hp["eval_rows"]] for t in held_packages)
    stride = max(1, held[0].shape[0] // hp["eval_rows"])
    held_eval = tuple(t[::stride][: hp["eval_rows"]] for t in held)
    n_rows = train_data[0].shape[0]
    train_tokens = int((train_data[2] >= 0).sum())
    print(f"data: {n_rows} rows ({train_tokens / (n_rows * hp['seq_len']):.1%} of slots used), "
          f"{train_tokens / 1e6:.1f} M tokens; {held[0].shape[0]} held-out rows; {time.time() - t0:.0f} s", flush=True)

    def loss_fn(m, ids, pos, seg, loads=None):
        return tf.joint_loss(m, ids, pos, seg, loads, dtype)

    eager = {name: getattr(tf, name) for name in ("attention", "mlp", "rms")}
    if hp["compile"] and device.type == "cuda":
        # the dense parts have fixed shapes: compile them; the experts' padded batch changes size every step.
        # One compiled graph per layer module and grad mode: raise the recompile limit above 2 x layers.
        import torch._dynamo as dynamo
        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, 64)
        for name, fn in eager.items():
            setattr(tf, name, torch.compile(fn, dynamic=False))

    g = torch.Generator().manual_seed(hp["seed"])
    order, cursor, epoch = torch.randperm(n_rows, generator=g), 0, 0
    total = args.steps or 10**9
    log = open(out / "log.jsonl", "w")
    run = {"hparams": hp, "config": config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "params": n_params, "train_rows": n_rows, "train_tokens": train_tokens,
           "heldout_eval_rows": int(held_eval[0].shape[0])}
    print(json.dumps(run), flush=True)
    t_train = time.time()
    t_probe, last_ckpt = None, time.time()
    step = 0
    p0, p1 = hp["probe_steps"]

    def save(tag):
        tokens_seen = step * hp["batch_rows"] * train_tokens / n_rows     # slots used, on average
        run.update(steps=step, tokens_seen=int(tokens_seen), epochs=tokens_seen / train_tokens,
                   train_seconds=time.time() - t_train, total_seconds=time.time() - T_START)
        (out / "run.json").write_text(json.dumps(run, indent=2))
        mb = save_fp8_shards(model, out / "fp8")
        print(f"checkpoint ({tag}) at step {step}: {mb:.1f} MB in {out / 'fp8'}", flush=True)

    while step < total:
        if step == p0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if not args.steps and step == p1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe) / (p1 - p0)
            left = min(hp["time_budget_s"] - (time.time() - t_train), hp["deadline_s"] - 45 - (time.time() - T_START))
            total = step + max(1, int(left / (per_step * 1.10)))    # 10%: evals and checkpoints
            total = min(total, int(hp["max_epochs"] * n_rows / hp["batch_rows"]))   # past that it memorises
            rate = hp["batch_rows"] * hp["seq_len"] / per_step
            print(f"step {per_step * 1000:.0f} ms, {rate / 1e3:.0f}k token slots/s: training for {total} steps "
                  f"(~{total * hp['batch_rows'] * hp['seq_len'] / 1e6:.0f} M token slots)", flush=True)
            log.write(json.dumps({"fixed_steps": total, "step_ms": per_step * 1000, "slots_per_s": rate}) + "\n")
        if cursor + hp["batch_rows"] > n_rows:
            order, cursor, epoch = torch.randperm(n_rows, generator=g), 0, epoch + 1
        idx = order[cursor:cursor + hp["batch_rows"]].to(device)
        cursor += hp["batch_rows"]
        ids, pos, seg = (t[idx].long() for t in train_data)
        lr = lr_at(step, total, hp)
        for group in opt.param_groups:
            group["lr"] = lr
        loads = []
        opt.zero_grad(set_to_none=True)
        try:
            main, mtp = loss_fn(model, ids, pos, seg, loads)
            loss = main + hp["mtp_lambda"] * mtp
            loss.backward()
        except Exception as e:          # a compile failure must not cost the run: fall back to eager once
            if step or not hp["compile"]:
                raise
            print(f"compiled step failed ({type(e).__name__}: {str(e)[:300]}); continuing eager", flush=True)
            for name, fn in eager.items():
                setattr(tf, name, fn)
            hp["compile"] = False
            run["compile_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            loads = []
            opt.zero_grad(set_to_none=True)
            main, mtp = loss_fn(model, ids, pos, seg, loads)
            loss = main + hp["mtp_lambda"] * mtp
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        with torch.no_grad():                       # auxiliary-loss-free balancing, one gate per MoE call
            vio = []
            for gate_m, load in zip(gates, loads):
                load = load.float()
                gate_m.e_score_correction_bias += hp["bias_update_speed"] * torch.sign(load.mean() - load)
                vio.append(load.max() / load.mean() - 1)
        step += 1
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            try:
                heldout_loss(loss_fn, model, tuple(t[:16] for t in held_eval))   # compile the no-grad graphs now
            except Exception as e:
                if not hp["compile"]:
                    raise
                print(f"compiled eval failed ({type(e).__name__}: {str(e)[:300]}); continuing eager", flush=True)
                for name, fn in eager.items():
                    setattr(tf, name, fn)
                hp["compile"] = False
                run["compile_failed"] = f"eval: {type(e).__name__}: {str(e)[:300]}"
            run["first_step_s"] = time.time() - t_train
            print(f"first step (compile included) and an eval batch: {run['first_step_s']:.0f} s", flush=True)
        deadline = time.time() - T_START > hp["deadline_s"] - 45
        if step % hp["log_every"] == 0 or step == total or deadline:
            rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(), "main": main.item(),
                   "mtp": mtp.item(), "grad_norm": gnorm.item(), "max_vio": float(torch.stack(vio).mean()),
                   "token_slots": step * hp["batch_rows"] * hp["seq_len"], "elapsed": time.time() - t_train}
            if step % hp["eval_every"] == 0 or step == total or deadline:
                rec["heldout_main"], rec["heldout_mtp"] = heldout_loss(loss_fn, model, held_eval)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if deadline:
            print(f"deadline: stopping at step {step} of {total}", flush=True)
            break
        if time.time() - last_ckpt > hp["checkpoint_every_s"]:
            save("periodic")
            last_ckpt = time.time()
    # held-out loss of the trained weights, then of their FP8 values (the fidelity the shipped weights keep)
    full = heldout_loss(loss_fn, model, held)
    pk = heldout_loss(loss_fn, model, held_packages)
    run["heldout_full"] = {"main": full[0], "mtp": full[1], "perplexity": math.exp(full[0])}
    run["heldout_packages"] = {"main": pk[0], "mtp": pk[1], "perplexity": math.exp(pk[0])}
    save("final")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp8_roundtrip_(model)
    q = heldout_loss(loss_fn, model, held)
    model.load_state_dict(state)
    run["heldout_full_fp8"] = {"main": q[0], "mtp": q[1], "perplexity": math.exp(q[0]),
                               "vs_fp32": math.exp(q[0] - full[0]) - 1}
    (out / "run.json").write_text(json.dumps(run, indent=2))
    print(f"held-out perplexity: stdlib {math.exp(full[0]):.3f} (fp32 master weights), {math.exp(q[0]):.3f} (FP8 "
          f"weights, {run['heldout_full_fp8']['vs_fp32']:+.2%}); packages {math.exp(pk[0]):.3f}", flush=True)
    print(f"{step} steps, {run['tokens_seen'] / 1e6:.0f} M tokens ({run['epochs']:.2f} epochs), "
          f"{time.time() - T_START:.0f} s since start", flush=True)


# ---------------------------------------------------------------------------------------------------
# export
def export(args) -> None:
    from safetensors.torch import load_file, save_file
    src = Path(args.weights)
    src = src / "fp8" if (src / "fp8").is_dir() else src
    tensors = {}
    for f in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in dest.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dest / "model.safetensors"))
    run_json = next(p for p in (src / "run.json", src.parent / "run.json") if p.is_file())
    config = dict(json.loads(run_json.read_text())["config"], quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(CORPUS_DIR / "tokenizer" / name, dest / name)
    shutil.copyfile(CORPUS_DIR / "heldout.jsonl", dest / "heldout.jsonl")
    if dest.resolve() != DEMO_DIR.resolve() and (DEMO_DIR / "generation_config.json").is_file():
        shutil.copyfile(DEMO_DIR / "generation_config.json", dest / "generation_config.json")
    for name, to in (("log.jsonl", "train_log.jsonl"), ("run.json", "train_run.json")):
        for where in (src, src.parent):
            if (where / name).is_file():
                shutil.copyfile(where / name, DATA_DIR / to)
                break
    print(f"{dest}: {(dest / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


# ---------------------------------------------------------------------------------------------------
# CPU decode speed of a config (random FP8 weights, the shipped tokenizer)
def speed(args) -> None:
    from dsv3 import LLM
    from dsv3.checkpoints.synthetic import random_checkpoint
    torch.set_num_threads(args.threads)
    for name in args.config.split(","):
        d = REPO / "build" / "speed" / name
        shutil.rmtree(d, ignore_errors=True)
        random_checkpoint(d, dict(DEMO_CONFIG, **CONFIGS[name]), fmt="fp8-block", dtype=torch.bfloat16)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(DEMO_DIR / f, d / f)
        mb = sum(f.stat().st_size for f in d.iterdir()) / 1e6
        llm = LLM(str(d), backend="cpu")
        llm.generate("def f(x):", max_new_tokens=8, temperature=0)
        wall, cpu = [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            c = llm.generate("def read_file(path):", max_new_tokens=96, temperature=0, ignore_eos=True)
            wall.append(len(c.token_ids) / (time.perf_counter() - t0))
            cpu.append(len(c.token_ids) / (time.process_time() - c0))
        print(f"{name}: {mb:.1f} MB, {args.threads} thread(s): wall {max(wall):.0f} tok/s, "
              f"CPU time {max(cpu):.0f} tok/s (best of {args.repeat})", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    m = sub.add_parser("manifest", help="sdists in build/sdists + the stdlib -> data/demo_corpus tables")
    m.add_argument("--stdlib", help="CPython 3.11.7's stdlib directory (default: this Python's)")
    m.set_defaults(func=manifest)
    c = sub.add_parser("corpus", help="verified files -> tokenizer + packed tokens in build/demo_corpus")
    c.add_argument("--stdlib", help="CPython 3.11.7's stdlib directory (default: this Python's)")
    c.add_argument("--offline", action="store_true", help="never download a missing sdist")
    c.set_defaults(func=corpus)
    t = sub.add_parser("train", help="train on the packed corpus (GPU if present)")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=0, help="steps (default 0: fit the time budget)")
    t.add_argument("--time-budget", dest="time_budget_s", type=float, help="seconds of training loop")
    t.add_argument("--deadline", dest="deadline_s", type=float, help="seconds since start: stop and save")
    t.add_argument("--checkpoint-every", dest="checkpoint_every_s", type=float)
    t.add_argument("--batch-rows", type=int)
    t.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    t.add_argument("--device")
    t.add_argument("--no-compile", action="store_true")
    t.add_argument("--tiny", action="store_true", help="toy dimensions (a CPU smoke test)")
    t.set_defaults(func=train)
    e = sub.add_parser("export", help="the FP8 shards `train` wrote -> dsv3/demo_model")
    e.add_argument("--weights", required=True, help="the directory `train --out` wrote (or its fp8/)")
    e.add_argument("--dest", default=str(DEMO_DIR))
    e.set_defaults(func=export)
    s = sub.add_parser("speed", help="CPU decode tokens/s of configs with random FP8 weights")
    s.add_argument("--config", default="demo,v1", help=f"comma-separated, of {', '.join(CONFIGS)}")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--repeat", type=int, default=3)
    s.set_defaults(func=speed)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
