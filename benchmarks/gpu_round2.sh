#!/usr/bin/env bash
# Session 4's last device call (one H200): MTP at depth 61 with batch-invariant kernels (oracle drafts stay
# the target's own tokens: issue 18), and serve_load after the engine-process trims (issue 21).
#   run: bash benchmarks/gpu_round2.sh       (carry .whl)
set -u
OUT=${OUT:-/tmp/dsv3-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step() { echo "== $(date +%T) $*"; }
{
  step env; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${DSV3_COMMIT:-unknown}"
  step "issue 18: plain vs MTP k = 1..3 at depth 61, acceptance 0.85, DSV3_BATCH_INVARIANT=1"
  DSV3_BATCH_INVARIANT=1 timeout 250 python3 benchmarks/speculative_decode.py --depth 61 --batches 1 8 32 --k 1 2 3 \
    --acceptance 0.85 --new-tokens 64
} 2>&1 | tail -40 > "$OUT/speculative_61_invariant.txt"
{
  step "issue 21: serve_load, 96 streams, in-process vs HTTP with the engine process"
  timeout 170 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 4,inf --prompt-len 256 \
    --output-len 64 --num-requests 96 --modes continuous,http-process --out "$OUT/serve_gpu.md"
} 2>&1 | grep -v "^\s*$" | tail -30 > "$OUT/serve_log.txt"
step done
