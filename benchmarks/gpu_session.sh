#!/usr/bin/env bash
# One device call: GPU tests, conformance check, then `dsv3-run bench`; everything lands in $OUT.
#   run: bash benchmarks/gpu_session.sh [sweep|tests|check|bench|serve|smoke|all]   (default all)
# serve needs starlette, uvicorn and pydantic, which the device image lacks: copy them from a venv into
# build/devdeps (pydantic_core from a wheel for the device's Python) and carry that path.
set -u
OUT=${OUT:-/tmp/dsv3-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/build/devdeps${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
what=${1:-all}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
if [[ $what == sweep || $what == all ]]; then
  timeout 300 python3 benchmarks/mla_decode_sweep.py 2>&1 | tee "$OUT/mla_sweep.txt"
fi
if [[ $what == tests || $what == all ]]; then
  timeout 420 python3 -m pytest tests/test_cuda_backend.py -x -q -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
fi
if [[ $what == check || $what == all ]]; then
  timeout 300 python3 -m dsv3.commands.main check --backend cuda 2>&1 | tail -60 | tee "$OUT/check.txt"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 540 python3 -m dsv3.commands.main bench ${BENCH_ARGS:-} --out "$OUT/bench.md" 2>&1 | tail -150 > "$OUT/bench_log.txt"
  cat "$OUT/bench.md" 2>/dev/null || tail -40 "$OUT/bench_log.txt"
fi
if [[ $what == serve ]]; then   # not in `all`: minutes of load at low request rates
  python3 -c "import dsv3.serve.app" || { echo "serve dependencies missing: see the top of this script"; exit 1; }
  timeout 500 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 4,16,64,inf \
    --prompt-len 256 --output-len 64 --num-requests 96 --static-batch 32 --modes static,continuous,http \
    --out "$OUT/serve_gpu.md" 2>&1 | grep -v "^\s*$" | tail -30
fi
if [[ $what == smoke ]]; then   # `dsv3-run serve --backend cuda` on the demo model with MTP, driven over HTTP
  python3 -c "import dsv3.serve.app" || { echo "serve dependencies missing: see the top of this script"; exit 1; }
  python3 -m dsv3.commands.main serve --backend cuda --speculative mtp --port 8765 > "$OUT/serve_log.txt" 2>&1 &
  server=$!
  timeout 300 python3 benchmarks/serve_smoke.py --url http://127.0.0.1:8765 2>&1 | tee "$OUT/serve_smoke.txt"
  kill -TERM $server; wait $server; echo "server exit status $? after SIGTERM"; grep -v "^INFO" "$OUT/serve_log.txt" | tail -5
  prompt="def read_file(path):"
  out=$(timeout 200 python3 -m dsv3.commands.main --backend cuda --profile cuda-bf16 --prompt "$prompt" --max-new-tokens 48 \
        --verbose 2> "$OUT/cuda_bf16_log.txt")
  { echo "cuda-bf16 profile: $out"; tail -2 "$OUT/cuda_bf16_log.txt"
    python3 benchmarks/serve_smoke.py --text "${out#"$prompt"}"; } 2>&1 | tee "$OUT/cuda_bf16.txt"
fi
