#!/usr/bin/env bash
# One device call (one H200): what issues 18, 21 and 16 need measured this session, most important first,
# each step bounded so the whole stays under the 10-minute call limit. Results land in $OUT (<= 8 files).
#   run: bash benchmarks/gpu_round.sh       (carry .whl: the serving stack the device image lacks)
set -u
OUT=${OUT:-/tmp/dsv3-gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DSV3_COMMIT=${DSV3_COMMIT:-unknown}
unset TRITON_INTERPRET
step() { echo "== $(date +%T) $*"; }
{
  step env; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $DSV3_COMMIT"
  step "issue 21: serve_load, 96 streams, in-process vs HTTP with the engine process"
  timeout 170 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 4,inf --prompt-len 256 \
    --output-len 64 --num-requests 96 --modes continuous,http-process --out "$OUT/serve_gpu.md"
} 2>&1 | grep -v "^\s*$" | tail -60 > "$OUT/serve_log.txt"
{
  step "issue 18: plain vs MTP k = 1..3 at depth 61, acceptance 0.85 (seeded oracle / wrong drafts)"
  timeout 230 python3 benchmarks/speculative_decode.py --depth 61 --batches 1 8 32 --k 1 2 3 --acceptance 0.85 \
    --new-tokens 64
} 2>&1 | tail -60 > "$OUT/speculative_61.txt"
{
  step "GPU tests: verify-sized GEMMs and MoE inside graphs; speculative greedy at every batch and k"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -k "test_linear or verify_sizes or every_batch_and_k"
} 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
step done
