"""Train the embedded demo model: a small DeepSeek-V3 on the Python standard library's own sources.

The architecture is the project's own model code (dsv3.core.model) run through the reference ops,
which are plain, differentiable PyTorch: MLA with q and kv low-rank projections, DeepSeekMoE with
16 routed experts under group-limited sigmoid routing (noaux_tc) and a shared expert, one dense
first layer, YaRN RoPE, and one MTP module trained with the paper's joint objective
L = L_main + lambda * L_MTP. Routing is balanced the auxiliary-loss-free way: after each step every
gate's e_score_correction_bias moves by gamma * sign(mean load - expert load).

Three stages, run in order (the GPU only for the second):

    python tools/train_demo.py corpus     # here: manifest check, tokenizer, packed tokens -> build/demo_corpus
    python tools/train_demo.py train --out DIR                     # GPU: fp32 weights (sharded) + loss log
    python tools/train_demo.py export --weights DIR                # here: dsv3/demo_model (FP8) + bf16 copy

Reproducible: the corpus is the exact file list in data/demo_corpus/MANIFEST.tsv (relative paths in
CPython 3.11.7's Lib/ with sha256; `corpus` refuses files whose hash differs); the tokenizer is
trained on the train split; every hyper-parameter is in this file (HPARAMS, DEMO_CONFIG) and the
seed fixes initialisation and data order. GPU kernels (index_add_, atomics in backward) are not
bitwise deterministic, so a rerun matches the loss curve closely, not to the last bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
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

from dsv3.backends.reference.ops import OPS, moe_gate as reference_moe_gate  # noqa: E402
from dsv3.commands.eval import document_segments  # noqa: E402
from dsv3.core.batch import Batch, Chunk  # noqa: E402
from dsv3.core.config import ModelConfig  # noqa: E402
from dsv3.core.model import DeepseekV3, Gate  # noqa: E402
from dsv3.core.ops import Ops  # noqa: E402

MANIFEST = REPO / "data" / "demo_corpus" / "MANIFEST.tsv"
CORPUS_DIR = REPO / "build" / "demo_corpus"          # ignored by git; carried to the device
DEMO_DIR = REPO / "dsv3" / "demo_model"
BF16_DIR = REPO / "build" / "demo_model_bf16"        # the unquantised reference for the fidelity table

DEMO_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 192,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
    "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False, "initializer_range": 0.02,
}

HPARAMS = {
    "seed": 0,
    "seq_len": 512,            # tokens per segment, BOS included (= YaRN's original context)
    "batch_segments": 32,      # segments per step (~16k tokens)
    "lr": 2e-3, "min_lr_ratio": 0.1, "warmup_steps": 100, "betas": (0.9, 0.95), "weight_decay": 0.1,
    "grad_clip": 1.0,
    "mtp_lambda": 0.3,         # DeepSeek-V3's lambda for the first 10T tokens
    "bias_update_speed": 1e-3,  # gamma of the auxiliary-loss-free balancing (the paper's value)
    "init_std": 0.02,
    "eval_every": 200, "eval_segments": 32, "log_every": 10,
    "time_budget_s": 390,      # --steps 0: fix the step count after timing the first steps to fit this
    "probe_steps": 30,
    "tokenizer_vocab": 4096,
    "heldout_every": 64,       # a file is held out when sha256(path) % 64 == 0 (~1.6% of files)
    "block_size": 64,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "q_lora_rank": 32,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "num_attention_heads": 2, "num_key_value_heads": 2}
CHECKPOINT_SHARD_BYTES = 15 << 20   # the device returns at most 8 files of at most 16 MiB each


# ---------------------------------------------------------------------------------------------------
# corpus
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HPARAMS["heldout_every"] == 0


def scan_stdlib(root: Path) -> list[tuple[str, str, int]]:
    """(relative path, sha256, bytes) of every UTF-8 .py file of the stdlib, minus third-party and
    machine-specific files, in sorted order."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "_sysconfigdata" in rel or "__pycache__" in rel:
            continue
        data = p.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not data.strip():
            continue
        out.append((rel, hashlib.sha256(data).hexdigest(), len(data)))
    return out


def write_manifest(root: Path, files) -> None:
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# CPython {sys.version.split()[0]} standard library ({root}), PSF License (LICENSE-PSF.txt)",
             "# split\tsha256\tbytes\tpath (relative to the stdlib directory)"]
    lines += [f"{'heldout' if heldout(rel) else 'train'}\t{h}\t{n}\t{rel}" for rel, h, n in files]
    MANIFEST.write_text("\n".join(lines) + "\n")
    shutil.copyfile(root / "LICENSE.txt", MANIFEST.parent / "LICENSE-PSF.txt")


def read_manifest() -> list[tuple[str, str, str]]:
    rows = []
    for line in MANIFEST.read_text().splitlines():
        if line.startswith("#"):
            continue
        split, h, _, rel = line.split("\t")
        rows.append((split, h, rel))
    return rows


def corpus(args) -> None:
    from safetensors.torch import save_file
    from dsv3.checkpoints.synthetic import write_tokenizer
    from dsv3.core.tokenizer import Tokenizer
    root = Path(args.stdlib) if args.stdlib else stdlib_dir()
    if not MANIFEST.is_file():
        write_manifest(root, scan_stdlib(root))
        print(f"wrote {MANIFEST}")
    texts = {"train": [], "heldout": []}
    paths = {"train": [], "heldout": []}
    bad = []
    for split, h, rel in read_manifest():
        data = (root / rel).read_bytes() if (root / rel).is_file() else b""
        if hashlib.sha256(data).hexdigest() != h:
            bad.append(rel)
            continue
        texts[split].append(data.decode("utf-8"))
        paths[split].append(rel)
    if bad:
        raise SystemExit(f"{len(bad)} manifest files are missing or differ under {root} (first: {bad[0]}); "
                         f"this corpus is CPython 3.11.7's Lib/ (pass --stdlib DIR)")
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    tok_dir = CORPUS_DIR / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    t0 = time.time()
    write_tokenizer(tok_dir, HPARAMS["tokenizer_vocab"], texts["train"])
    tok = Tokenizer(tok_dir)
    print(f"tokenizer: {tok.vocab_size} tokens in {time.time() - t0:.0f} s")
    for split in ("train", "heldout"):
        segs = []
        for text in texts[split]:
            segs += [s for s in document_segments(tok.encode(text, add_bos=False), HPARAMS["seq_len"],
                                                  tok.bos_id, tok.eos_id) if len(s) >= 3]
        flat = torch.tensor([t for s in segs for t in s], dtype=torch.int16)
        offsets = torch.tensor([0] + [len(s) for s in segs], dtype=torch.int64).cumsum(0)
        save_file({"tokens": flat, "offsets": offsets}, str(CORPUS_DIR / f"{split}.safetensors"))
        print(f"{split}: {len(texts[split])} files, {sum(map(len, texts[split])) / 1e6:.1f} MB text, "
              f"{len(segs)} segments, {flat.numel() / 1e6:.2f} M tokens")
    with open(CORPUS_DIR / "heldout.jsonl", "w") as f:
        for rel, text in zip(paths["heldout"], texts["heldout"]):
            f.write(json.dumps({"path": rel, "text": text}) + "\n")


def load_segments(split: str) -> list[list[int]]:
    from safetensors.torch import load_file
    d = load_file(str(CORPUS_DIR / f"{split}.safetensors"))
    tokens, offsets = d["tokens"].tolist(), d["offsets"].tolist()
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


# ---------------------------------------------------------------------------------------------------
# model and loss
class LoadCounter:
    """Wraps the reference moe_gate to count tokens per expert for each gate (keyed by its bias)."""

    def __init__(self):
        self.loads: dict[int, torch.Tensor] = {}

    def moe_gate(self, x, weight, bias, spec):
        weights, ids = reference_moe_gate(x, weight, bias, spec)
        load = torch.bincount(ids.flatten(), minlength=weight.shape[0])
        self.loads[id(bias)] = self.loads.get(id(bias), 0) + load
        return weights, ids


def build_model(cfg: ModelConfig, counter: LoadCounter, device, seed: int, std: float) -> DeepseekV3:
    ops = Ops.from_mapping({**OPS, "moe_gate": counter.moe_gate}, {})
    model = DeepseekV3(cfg, ops, "dense", torch.float32)
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


def joint_loss(model: DeepseekV3, seqs: list[list[int]], device, block_size: int):
    """(main CE, MTP CE) of one flat batch; MTP slot i sees (h_i, t_{i+1}) and predicts t_{i+2}."""
    cfg = model.cfg
    chunks, start = [], 0
    for s in seqs:
        nb = -(-len(s) // block_size)
        chunks.append(Chunk(s, 0, list(range(start, start + nb))))
        start += nb
    caches = [torch.zeros(start, block_size, cfg.latent_dim, device=device) for _ in range(model.num_cache_layers)]
    batch = Batch.build(chunks, block_size, device)
    hidden = model(batch, caches)                                                # [T, D]
    targets = torch.tensor([t for s in seqs for t in s[1:] + [-100]], device=device)
    main = F.cross_entropy(model.logits(hidden), targets, ignore_index=-100)

    mtp_batch = Batch.build([Chunk(s[1:], 0, c.blocks) for s, c in zip(seqs, chunks)], block_size, device)
    prev = torch.tensor([r for rows in batch.token_rows for r in rows[:-1]], device=device)
    h = model.mtp_hidden(mtp_batch.input_ids, hidden[prev], mtp_batch, caches)  # [T - B, D]
    mtp_targets = torch.tensor([t for s in seqs for t in s[2:] + [-100]], device=device)
    mtp = F.cross_entropy(model.mtp.logits(h), mtp_targets, ignore_index=-100)
    return main, mtp


def mtp_shared(cfg: ModelConfig) -> dict[str, str]:
    """MTP tensors that are the main model's (the paper shares them; the checkpoint repeats them)."""
    n = cfg.num_hidden_layers
    return {f"model.layers.{n}.embed_tokens.weight": "model.embed_tokens.weight",
            f"model.layers.{n}.shared_head.head.weight": "lm_head.weight"}


def checkpoint_tensors(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Official layout names (experts unstacked), float32 on the CPU, without the shared MTP copies."""
    out = {}
    shared = mtp_shared(model.cfg)
    for name, p in model.state_dict(keep_vars=False).items():
        if name in shared:
            continue
        p = p.detach().float().cpu()
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(.+)$", name)
        if m:
            for e in range(p.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3)}"] = p[e].clone()
        else:
            out[name] = p.clone()
    return out


def save_sharded(tensors: dict[str, torch.Tensor], path: Path, config: dict) -> None:
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        if cur and size + t.numel() * t.element_size() > CHECKPOINT_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t.contiguous(), size + t.numel() * t.element_size()
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname))
        weight_map.update({n: fname for n in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------------
# training
def lr_at(step: int, total: int, hp: dict) -> float:
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    progress = min(1.0, (step - hp["warmup_steps"]) / max(1, total - hp["warmup_steps"]))
    return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model, segs, device, block_size, batch=16) -> tuple[float, float]:
    tot_main = tot_mtp = 0.0
    for i in range(0, len(segs), batch):
        main, mtp = joint_loss(model, segs[i:i + batch], device, block_size)
        tot_main, tot_mtp = tot_main + main.item(), tot_mtp + mtp.item()
    n = -(-len(segs) // batch)
    return tot_main / n, tot_mtp / n


def train(args) -> None:
    hp = dict(HPARAMS)
    config = dict(DEMO_CONFIG, **(TINY if args.tiny else {}))
    if args.batch_segments:
        hp["batch_segments"] = args.batch_segments
    if args.time_budget:
        hp["time_budget_s"] = args.time_budget
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(hp["seed"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = ModelConfig.from_hf(config)
    counter = LoadCounter()
    model = build_model(cfg, counter, device, hp["seed"], hp["init_std"])
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp["lr"], betas=hp["betas"],
                            fused=device.type == "cuda")
    n_params = sum(p.numel() for p in params)

    train_segs, held = load_segments("train"), load_segments("heldout")
    stride = max(1, len(held) // hp["eval_segments"])
    held_eval = held[::stride][: hp["eval_segments"]]
    g = torch.Generator().manual_seed(hp["seed"])
    order, cursor, epoch = torch.randperm(len(train_segs), generator=g).tolist(), 0, 0

    total = args.steps or 10**9
    log = open(out / "log.jsonl", "w")
    run = {"hparams": hp, "config": config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "params": n_params, "train_segments": len(train_segs),
           "train_tokens": sum(map(len, train_segs)), "heldout_eval_segments": len(held_eval)}
    print(json.dumps(run), flush=True)
    t_start = time.time()
    t_probe = None
    tokens_seen = 0
    step = 0
    while step < total:
        if step == 5:
            t_probe = time.time()
        if not args.steps and step == hp["probe_steps"]:
            per_step = (time.time() - t_probe) / (hp["probe_steps"] - 5)
            total = step + int((hp["time_budget_s"] - (time.time() - t_start)) / (per_step * 1.08))
            print(f"step time {per_step * 1000:.0f} ms: training for {total} steps", flush=True)
            log.write(json.dumps({"fixed_steps": total, "step_ms": per_step * 1000}) + "\n")
        seqs = []
        while len(seqs) < hp["batch_segments"]:
            if cursor == len(order):
                order, cursor, epoch = torch.randperm(len(train_segs), generator=g).tolist(), 0, epoch + 1
            seqs.append(train_segs[order[cursor]])
            cursor += 1
        lr = lr_at(step, total, hp)
        for group in opt.param_groups:
            group["lr"] = lr
        counter.loads.clear()
        main, mtp = joint_loss(model, seqs, device, hp["block_size"])
        loss = main + hp["mtp_lambda"] * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(list(params), hp["grad_clip"])
        opt.step()
        with torch.no_grad():                       # auxiliary-loss-free balancing
            vio = []
            for gate in gates:
                load = counter.loads[id(gate.e_score_correction_bias)].float()
                gate.e_score_correction_bias += hp["bias_update_speed"] * torch.sign(load.mean() - load)
                vio.append((load.max() / load.mean() - 1).item())
        tokens_seen += sum(map(len, seqs))
        step += 1
        if step % hp["log_every"] == 0 or step == total:
            rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(), "main": main.item(),
                   "mtp": mtp.item(), "grad_norm": gnorm.item(), "max_vio": sum(vio) / len(vio),
                   "tokens": tokens_seen, "elapsed": time.time() - t_start}
            if step % hp["eval_every"] == 0 or step == total:
                rec["heldout_main"], rec["heldout_mtp"] = heldout_loss(model, held_eval, device, hp["block_size"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    run.update(steps=step, tokens_seen=tokens_seen, epochs=tokens_seen / run["train_tokens"],
               seconds=time.time() - t_start)
    (out / "run.json").write_text(json.dumps(run, indent=2))
    save_sharded(checkpoint_tensors(model), out, config)
    print(f"saved {out}: {step} steps, {tokens_seen / 1e6:.1f} M tokens in {time.time() - t_start:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------
# export
def export(args) -> None:
    from safetensors.torch import load_file
    from dsv3.checkpoints.synthetic import to_checkpoint_format, write_checkpoint
    src = Path(args.weights)
    weights = {}
    for f in sorted(src.glob("model-*.safetensors")):
        weights.update(load_file(str(f)))
    config = json.loads((src / "config.json").read_text())
    for copy, original in mtp_shared(ModelConfig.from_hf(config)).items():
        weights[copy] = weights[original].clone()
    for out, fmt in ((Path(args.dest), "fp8-block"), (BF16_DIR, "dense")):
        if out.exists():
            shutil.rmtree(out)
        write_checkpoint(out, config, to_checkpoint_format(weights, fmt, torch.bfloat16), fmt=fmt)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(CORPUS_DIR / "tokenizer" / name, out / name)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{out}: {fmt}, {size / 1e6:.2f} MB")
    shutil.copyfile(CORPUS_DIR / "heldout.jsonl", Path(args.dest) / "heldout.jsonl")
    for name in ("log.jsonl", "run.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, REPO / "data" / "demo_corpus" / f"train_{name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("corpus", help="tokenizer + packed tokens from the manifest's stdlib files")
    c.add_argument("--stdlib", help="the stdlib directory (default: this Python's)")
    c.set_defaults(func=corpus)
    t = sub.add_parser("train", help="train on the packed corpus (GPU if present)")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=0, help="steps (default 0: fit HPARAMS time_budget_s)")
    t.add_argument("--time-budget", type=float, help="seconds, with --steps 0")
    t.add_argument("--batch-segments", type=int)
    t.add_argument("--device")
    t.add_argument("--tiny", action="store_true", help="toy dimensions (a CPU smoke test)")
    t.set_defaults(func=train)
    e = sub.add_parser("export", help="trained weights -> dsv3/demo_model (FP8 layout) and a bf16 copy")
    e.add_argument("--weights", required=True, help="the directory `train --out` wrote")
    e.add_argument("--dest", default=str(DEMO_DIR))
    e.set_defaults(func=export)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
