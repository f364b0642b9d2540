#!/usr/bin/env bash
# One device call (one H200) for issues 18 and 21, each step bounded so the whole stays under the 10-minute call
# limit; results land in $OUT. Steps, in the order given (default: all but speculative-default):
#   serve                  serve_load, 96 streams, in-process vs HTTP with the engine process (issue 21)
#   speculative            MTP k = 1..3 vs plain at depth 61, acceptance 0.85, DSV3_BATCH_INVARIANT=1 (issue 18:
#                          oracle drafts stay the target's own tokens only with batch-invariant kernels)
#   speculative-default    the same with the default, batch-dependent kernels (step-time ratios only)
#   gpu-tests              verify-sized GEMMs and MoE inside graphs; speculative greedy at every batch and k
#   pdl-tests              issue 16: the GPU tests but the 30-GB speculative ones, the PDL chain test among them,
#                          and `dsv3-run check --backend cuda`, with programmatic dependent launch on
#   probe                  issue 16: benchmarks/pdl_gemv_probe.py (one-row GEMMs, PDL variants) and ncu of q_a / kv_a
#   bench-e2e              issue 16: `bench --part e2e` at depth 61, batch 1/8/64, contexts 1024 and 4096, profiled
#   sweep                  issue 16: benchmarks/decode_tuning_sweep.py (mla_decode splits, MoE tiles at T = 1 / 8)
#   pdl-bench              issue 16: `bench --part e2e` at depth 61, batch 1/8/64, context 1024, PDL on (profiled)
#                          and off (DSV3_PDL=0), one after the other
#   run: DSV3_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_round.sh [step ...]   (carry .whl: the
#        serving stack the device image lacks)
set -u
OUT=${OUT:-/tmp/dsv3-gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
stamp() { echo "== $(date +%T) $*"; }
speculative() {   # extra environment, output file
  env "$@" timeout 250 python3 benchmarks/speculative_decode.py --depth 61 --batches 1 8 32 --k 1 2 3 \
    --acceptance 0.85 --new-tokens 64
}
{ stamp env; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${DSV3_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
for what in ${@:-serve speculative gpu-tests}; do
  case $what in
    serve) { stamp "serve_load, 96 streams"
      timeout 170 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 4,inf --prompt-len 256 \
        --output-len 64 --num-requests 96 --modes continuous,http-process --out "$OUT/serve_gpu.md"
      } 2>&1 | grep -v "^\s*$" | tail -30 > "$OUT/serve_log.txt" ;;
    speculative) { stamp "MTP at depth 61, batch-invariant"; speculative DSV3_BATCH_INVARIANT=1; } 2>&1 | tail -40 \
      > "$OUT/speculative_61_invariant.txt" ;;
    speculative-default) { stamp "MTP at depth 61, default kernels"; speculative DSV3_BATCH_INVARIANT=0; } 2>&1 \
      | tail -40 > "$OUT/speculative_61.txt" ;;
    gpu-tests) { stamp "GPU tests"
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py \
        -k "test_linear or verify_sizes or every_batch_and_k"
      } 2>&1 | tail -30 > "$OUT/gpu_tests.txt" ;;
    pdl-tests) { stamp "GPU tests, PDL on"
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -k "not speculative"
      } 2>&1 | tail -30 > "$OUT/gpu_tests_pdl.txt"
      { stamp "check --backend cuda"; timeout 90 python3 -m dsv3.commands.main check --backend cuda
      } 2>&1 | tail -12 > "$OUT/check_cuda.txt" ;;
    probe) { stamp "one-row GEMMs and a layer-like chain, plain / PDL + prefetch / PDL"
      timeout 150 python3 benchmarks/pdl_gemv_probe.py; } 2>&1 | tail -30 > "$OUT/probe_table.txt"
      [[ ${PROBE_NCU:-1} == 1 ]] && { for shape in q_a kv_a; do stamp "ncu $shape M=1"
        timeout 60 ncu --clock-control none -k regex:fp8_gemm --launch-skip 2 --launch-count 1 --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
          --section SchedulerStats python3 benchmarks/pdl_gemv_probe.py --ncu "$shape"; done
      } 2>&1 | grep -v "^==PROF==" | tail -230 > "$OUT/probe.txt" ;;
    bench-e2e) { stamp "bench e2e depth 61, default kernels"
      timeout 300 python3 -m dsv3.commands.main bench --part e2e --batches ${E2E_BATCHES:-1,8,64} --contexts 1024,4096 \
        --prefill "" --out "$OUT/bench_e2e.md"; } 2>&1 | tail -60 > "$OUT/bench_e2e_log.txt" ;;
    sweep) { stamp "decode tuning sweep: mla_decode splits, fused MoE tiles"
      timeout 300 python3 benchmarks/decode_tuning_sweep.py --out "$OUT/decode_sweep.md"; } 2>&1 | tail -20 \
      > "$OUT/decode_sweep_log.txt" ;;
    pdl-bench) for on in 1 0; do { stamp "bench e2e depth 61, DSV3_PDL=$on"
      DSV3_PDL=$on timeout 170 python3 -m dsv3.commands.main bench --part e2e --batches ${PDL_BATCHES:-1,8,64} \
        --contexts 1024 --prefill "" $([[ $on == 0 ]] && echo --no-profile) --out "$OUT/bench_e2e_pdl$on.md"
      } 2>&1 | tail -60 > "$OUT/bench_e2e_pdl${on}_log.txt"; done ;;
    *) echo "unknown step $what (serve speculative speculative-default gpu-tests pdl-tests pdl-bench probe sweep bench-e2e)"; exit 2 ;;
  esac
done
stamp done
