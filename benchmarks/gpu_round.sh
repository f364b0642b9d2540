#!/usr/bin/env bash
# This session's one device call (one H200): what issues 18, 21 and 22 need measured, most important first,
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
  step "issue 18: MTP verify through the engine under graph / cuBLAS switches"
  timeout 170 python3 benchmarks/spec_diagnose.py --skip-ops --batches 8 16 --k 1 2 3
} 2>&1 | tee "$OUT/spec_diagnose.txt"
{
  step "issue 21: serve_load, 96 streams, in-process vs HTTP with the engine process"
  timeout 170 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 4,inf --prompt-len 256 \
    --output-len 64 --num-requests 96 --modes continuous,http-process --out "$OUT/serve_gpu.md"
} 2>&1 | grep -v "^\s*$" | tail -40 > "$OUT/serve_log.txt"
{
  step "GPU tests: verify-sized GEMMs and MoE inside graphs; speculative greedy at every batch and k"
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -k "test_linear or verify_sizes or every_batch_and_k"
} 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
{
  step "issue 22: V3.2 sparse decode beside dense MLA at 32k / 128k"
  timeout 80 python3 benchmarks/dsa_decode.py --contexts 32768,131072 --batches 1,8 --e2e-batches 1 --out "$OUT/dsa.md"
} 2>&1 | tail -40 > "$OUT/dsa_log.txt"
{
  step "issue 21: decode at batch 256, depth 61 (eager: above the graph buckets)"
  timeout 60 python3 -m dsv3 bench --part e2e --depth 61 --batches 256 --contexts 1024 --prefill "" --no-profile
} 2>&1 | tail -25 > "$OUT/bench256.txt"
step done
