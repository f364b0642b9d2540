"""Checkpoint I/O benchmark: streaming load and `convert` on a synthetic FP8 checkpoint at real
DeepSeek-V3 tensor shapes, beside the disk's own sequential read speed, with peak RSS beside the
largest shard. Not a unit test; run it by hand:

    python benchmarks/checkpoint_io.py [--dir /tmp/dsv3-io-bench] [--out benchmarks/results/checkpoint_io.md]
        [--rows load] [--repeat 3] [--keep] [--reuse]

`--rows load` runs only the FP8 -> FP8 load rows (minutes; the dequantising load and the converts
take 10-20 more); `--repeat N` runs each load N times and reports the median (a shared machine is
noisy); `--keep` leaves the synthetic checkpoint in place and `--reuse` loads it instead of
building a new one.

The checkpoint uses the official config.json with fewer layers and routed experts (every tensor
keeps its real shape: 7168-wide projections, [2048, 7168] experts, the 129280-row embedding and
head), about 9 GB in shards of at most 2 GB.

Method:
- Disk: O_DIRECT sequential reads (64 MiB, page-aligned buffer) of the shards, which bypass the
  page cache, so this is the device's speed, measured in the same run. Beside it, the same reads
  buffered from a cold page cache: the bound for anything that reads through the page cache (a
  memory map included), which also allocates every page it caches.
- Memory: filling freshly allocated tensors of the model's size (torch.empty, then fill_): the
  first-touch cost every load pays for its parameters, whatever it reads from.
- Cold runs: every shard is fsynced and dropped from the page cache with posix_fadvise(DONTNEED)
  (no root needed) before the run; `fincore` confirms. Warm runs read from the page cache.
- Each load / convert runs in a fresh process under `/usr/bin/time -v` (maximum resident set size).
  Parameters are allocated untouched (torch.empty), so peak RSS = python + torch + the filled model
  + what the loader holds; "RSS beyond model" subtracts the model's parameter bytes and the
  process's RSS before loading.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REFERENCE = Path("/work/shared/reference/deepseek-v3/config.json")
SHARD_BYTES = 2 * 10**9
BENCH_CONFIG = {"num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 32,
                "num_nextn_predict_layers": 0}


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hf_config() -> dict:
    if REFERENCE.is_file():
        config = json.loads(REFERENCE.read_text())
    else:   # the official numbers that matter, if the reference copy is not here
        from dsv3.checkpoints.synthetic import TINY_CONFIG
        config = {**TINY_CONFIG, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                  "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
                  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                  "v_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                  "max_position_embeddings": 163840}
    config.update(BENCH_CONFIG)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    return config


def build(path: Path) -> dict:
    """Write the synthetic checkpoint with the streaming writer; random bits, never zeros."""
    from dsv3.backends.reference.ops import OPS
    from dsv3.core.config import ModelConfig
    from dsv3.checkpoints.convert import SafetensorsWriter, TensorSpec
    from dsv3.core.loader import expected_tensors
    from dsv3.core.model import DeepseekV3
    from dsv3.core.ops import Ops
    config = hf_config()
    with torch.device("meta"):
        model = DeepseekV3(ModelConfig.from_hf(config), Ops.from_mapping(OPS, {}), "fp8-block", torch.bfloat16,
                           with_mtp=False)
    specs = [TensorSpec(n, dt, shape) for n, (shape, dt) in expected_tensors(model).items()]
    shards, size = [[]], 0
    for s in specs:
        if size and size + s.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(path / name, part)
        for s in part:
            if s.dtype == torch.float8_e4m3fn:        # random bit patterns, NaN (0x7F / 0xFF) mapped to 0x7E
                bits = torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=g)
                bits[(bits & 0x7F) == 0x7F] &= 0xFE
                t = bits.view(torch.float8_e4m3fn)
            elif s.dtype == torch.float32:            # block scales ~ amax / 448 of 0.02-std weights
                t = torch.rand(s.shape, generator=g) * 2e-4 + 1e-5
            else:
                t = (torch.randn(s.shape, generator=g) * 0.02).to(s.dtype)
            w.write(s.name, t)
            weight_map[s.name] = name
        w.close()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = sorted(path.glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest": max(f.stat().st_size for f in files)}


def drop_cache(files) -> str:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if shutil.which("fincore"):
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True, text=True)
        return f"{sum(int(x) for x in out.stdout.split()) / 1e9:.3f} GB still cached"
    return "fincore not available"


def direct_read(files) -> float:
    """GB/s of O_DIRECT sequential reads (bypasses the page cache)."""
    buf = mmap.mmap(-1, 64 << 20)          # page-aligned, as O_DIRECT needs
    total, t0 = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            while (n := os.readv(fd, [buf])) > 0:
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - t0) / 1e9


def first_touch(nbytes: int) -> float:
    """GB/s of filling fresh tensors (first-touch page faults), in 1 GiB pieces like parameters."""
    t0 = time.perf_counter()
    pieces = [torch.empty(min(1 << 30, nbytes - o), dtype=torch.uint8).fill_(1) for o in range(0, nbytes, 1 << 30)]
    seconds = time.perf_counter() - t0
    del pieces
    return nbytes / seconds / 1e9


def cached_read(files) -> float:
    buf = bytearray(64 << 20)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (n := fh.readinto(buf)) > 0:
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def measured(args: list[str]) -> dict:
    """Run this script's worker under /usr/bin/time -v: its JSON result plus the peak RSS."""
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["peak_rss"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    return result


def worker(argv: list[str]) -> None:
    kind, path, fmt = argv[0], Path(argv[1]), argv[2]
    torch.set_num_threads(os.cpu_count())
    if kind == "load":
        from dsv3.backends.reference.ops import OPS
        from dsv3.core.config import ModelConfig
        from dsv3.core.loader import Checkpoint, load_weights
        from dsv3.core.model import DeepseekV3
        from dsv3.core.ops import Ops
        base = rss_bytes()
        model = DeepseekV3(ModelConfig.from_file(path / "config.json"), Ops.from_mapping(OPS, {}), fmt,
                           torch.bfloat16, with_mtp=False)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        ckpt = Checkpoint(path)
        t0 = time.perf_counter()
        load_weights(model, ckpt, progress=False)
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "read": ckpt.bytes_read, "params": params, "base_rss": base}))
    else:
        from dsv3.checkpoints.convert import convert_checkpoint
        base = rss_bytes()
        out = Path(argv[3])
        r = convert_checkpoint(path, out, fmt, progress=False, log=lambda m: None)
        print(json.dumps({"seconds": r.seconds, "read": r.source_bytes, "written": r.output_bytes, "params": 0,
                          "base_rss": base, "classes": {k: [v.max_rel, v.rms_rel] for k, v in r.stats.items()}}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/dsv3-io-bench")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--reuse", action="store_true", help="load DIR/fp8 from an earlier --keep run instead of building")
    ap.add_argument("--rows", choices=("all", "load"), default="all",
                    help="load: only the FP8 -> FP8 load rows (skip the dequantising load and the converts)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each load row; the table shows the median")
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "fp8"
    if args.reuse and not (src / "config.json").is_file():
        raise SystemExit(f"--reuse: no checkpoint at {src}; run once with --keep first")
    if root.exists() and not args.reuse:
        raise SystemExit(f"{root} exists; remove it, pass another --dir, or --reuse its checkpoint")
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 40e9 and not args.reuse:
        raise SystemExit(f"{root}: {free / 1e9:.0f} GB free; the benchmark needs ~40 GB (source, bf16 and int8 copies)")
    rows, notes = [], [f"load average at start (other work on the machine): {os.getloadavg()[0]:.1f}"]
    try:
        if args.reuse:
            files = sorted(src.glob("*.safetensors"))
            info = {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
                    "largest": max(f.stat().st_size for f in files)}
            notes.append(f"reused the checkpoint in {src}")
        else:
            t0 = time.perf_counter()
            info = build(src)
            notes.append(f"built {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards in "
                         f"{time.perf_counter() - t0:.0f} s")
        files = sorted(src.glob("*.safetensors"))
        drop_cache(files)
        disk = direct_read(files)
        drop_cache(files)
        cold_gbps = cached_read(files)
        cache_gbps = (cached_read(files), cached_read(files))[1]   # second pass: all cached if RAM allows
        touch_gbps = first_touch(info["bytes"])
        print(f"disk {disk:.2f} GB/s, buffered cold {cold_gbps:.2f} GB/s, page cache {cache_gbps:.2f} GB/s, "
              f"first touch {touch_gbps:.2f} GB/s, {info}", flush=True)
        rows.append(("disk: O_DIRECT sequential read", info["bytes"], info["bytes"] / disk / 1e9, None, None))
        rows.append(("disk via page cache: buffered read (cold)", info["bytes"], info["bytes"] / cold_gbps / 1e9,
                     None, None))
        rows.append(("page cache: buffered read (warm)", info["bytes"], info["bytes"] / cache_gbps / 1e9, None, None))
        rows.append(("memory: fill fresh tensors, first touch", info["bytes"], info["bytes"] / touch_gbps / 1e9,
                     None, None))

        def run(label, args, cold=True, out=None, repeat=1):
            runs = []
            for _ in range(repeat):
                note = drop_cache(files) if cold else "warm"
                runs.append(measured(["--worker", *args]))
                print(label, {k: v for k, v in runs[-1].items() if k != "classes"}, flush=True)
            r = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]     # the median run
            rows.append((label, r["read"], r["seconds"], r["peak_rss"], r["peak_rss"] - r["params"] - r["base_rss"]))
            notes.append(f"{label}: {note}; model parameters {r['params'] / 1e9:.2f} GB, process RSS before "
                         f"loading {r['base_rss'] / 1e9:.2f} GB" + (f"; wrote {r['written'] / 1e9:.2f} GB" if out else ""))
            if repeat > 1:
                notes[-1] += ("; median of " + ", ".join(f"{x['read'] / x['seconds'] / 1e9:.2f}" for x in runs)
                              + " GB/s")
            if out is not None:
                worst = max(r["classes"].items(), key=lambda kv: kv[1][0])
                notes[-1] += f"; worst class {worst[0]}: max rel {worst[1][0]:.2e}, rms rel {worst[1][1]:.2e}"
                shutil.rmtree(out)

        run("load fp8-block -> fp8-block model (cold)", ["load", str(src), "fp8-block"], repeat=args.repeat)
        run("load fp8-block -> fp8-block model (warm)", ["load", str(src), "fp8-block"], cold=False,
            repeat=args.repeat)
        if args.rows == "all":
            run("load fp8-block -> bf16 model, dequantised (cold)", ["load", str(src), "dense"])
            for to in ("bf16", "int8-w8a8"):
                out = root / to
                run(f"convert fp8-block -> {to} (cold, verified)", ["convert", str(src), to, str(out)], out=out)
        notes.append(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(root, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    lines = ["# Checkpoint I/O: streaming load and convert (CPU machine)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu}), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
             f"torch {torch.__version__}, checkpoint on the root disk ({root}). Date: {time.strftime('%Y-%m-%d')}.",
             f"Synthetic FP8 checkpoint at real DeepSeek-V3 tensor shapes (official config.json, "
             f"{BENCH_CONFIG['num_hidden_layers']} layers, {BENCH_CONFIG['n_routed_experts']} routed experts, no MTP): "
             f"{info['bytes'] / 1e9:.2f} GB in {info['shards']} shards, largest shard {info['largest'] / 1e9:.2f} GB.", "",
             "| run | data read (GB) | time (s) | GB/s | vs disk | peak RSS (GB) | RSS beyond model (GB) | largest shard (GB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, nbytes, seconds, peak, beyond in rows:
        gbps = nbytes / seconds / 1e9
        lines.append(f"| {label} | {nbytes / 1e9:.2f} | {seconds:.1f} | {gbps:.2f} | {gbps / disk:.2f}x | "
                     + (f"{peak / 1e9:.2f} | {beyond / 1e9:.2f} | {info['largest'] / 1e9:.2f} |" if peak else "| | |"))
    lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
