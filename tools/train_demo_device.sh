#!/usr/bin/env bash
# The demo model's training: one device call on one H200, <= 9 minutes, results in $OUT.
#
#   here, first:  python tools/train_demo.py corpus     # build/demo_corpus (pinned sdists, verified files, tokens)
#   the call:     run(kind="nvidia-h200", timeout_s=600, command="bash tools/train_demo_device.sh",
#                     carry=["build/demo_corpus/train.rows.safetensors.xz",
#                            "build/demo_corpus/heldout.rows.safetensors.xz",
#                            "build/demo_corpus/heldout_packages.rows.safetensors.xz"])
#   here, after:  python tools/train_demo.py export --weights <files_at>   # -> dsv3/demo_model
#                 python benchmarks/demo_eval.py --out benchmarks/results/demo_eval_after.md
#
# What comes back (6 files, ~56 MB; the limit is 8 files of <= 16 MiB, 64 MiB in all): log.jsonl (the loss
# curve), run.json (hyper-parameters, config, steps, tokens, held-out perplexity of the fp32 and the FP8
# weights), fp8/model-0000N-of-00004.safetensors (the shipped format, written every 150 s and at the end,
# so a call cut at its limit still returns the last checkpoint).
# Time: start-up and data ~15 s; training loop 400 s (compile in its first step); final held-out scoring,
# FP8 round trip and checkpoint ~20 s: ~450 s in all. It stops itself at 510 s since start whatever
# happens (then scores and saves), and `timeout` ends it at 570 s.
set -u
OUT=${OUT:-/tmp/demo-train}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ls -la build/demo_corpus
timeout 570 python3 tools/train_demo.py train --out "$OUT" 2>&1
