#!/usr/bin/env bash
# One multi-GPU device call (nvidia-h200-x2 / -x4 / -x8), N = the GPUs visible. Results land in $OUT.
#   check        `dsv3-run check --backend cuda` on GPU 0 (the conformance suite, single GPU)
#   correctness  small FP8 model, NCCL at tp=N, ep=N, tp x ep, dp=N (+ ep=N), dp x tp against one process,
#                logits + greedy tokens
#   demo         the trained demo model converted to bf16 (real logit margins), same layouts, greedy equality
#   scaling      full-width DeepSeek-V3, 8 layers, random FP8 weights: decode/prefill on 1 and N GPUs
#   bash benchmarks/gpu_multi_session.sh [check|correctness|demo|scaling|all]...   (default all)
set -u
OUT=${OUT:-/tmp/dsv3-multi}; mkdir -p "$OUT"
# NVLink multicast off (the device tool's KINDS.md)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
N=$(nvidia-smi -L | wc -l)
stamp() { echo "== $(date +%T) $*"; }
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"; } 2>&1 | tee "$OUT/env.txt"
run_n() { local n=$1; shift; timeout 150 torchrun --nproc-per-node "$n" --no-python python3 benchmarks/multi_gpu.py "$@"; }
layouts() {   # tp ep dp for N GPUs: tp=N, ep=N, both, (N >= 4) tp=2 x ep=N; data-parallel attention dp=N with
              # ep=N, and (N >= 4) dp=N/2 x tp=2 with ep=N
  echo "$N 1 1"; echo "1 $N 1"; echo "$N $N 1"; [[ $N -ge 4 ]] && echo "2 $N 1"
  echo "1 $N $N"; [[ $N -ge 4 ]] && echo "2 $N $((N / 2))"; true
}
check_layouts() {   # dir, extra args...
  local d=$1; shift
  stamp single; timeout 150 python3 benchmarks/multi_gpu.py check --dir "$d" "$@"
  layouts | while read -r tp ep dp; do
    stamp "ws$N tp$tp ep$ep dp$dp"; run_n "$N" check --dir "$d" --tp "$tp" --ep "$ep" --dp "$dp" "$@"; done
  stamp compare
}
for what in ${@:-all}; do
  if [[ $what == check || $what == all ]]; then
    stamp check; CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m dsv3.commands.main check --backend cuda 2>&1 | tail -25 | tee "$OUT/check.txt"
  fi
  if [[ $what == correctness || $what == all ]]; then
    D=/tmp/mg$N; mkdir -p $D
    { check_layouts $D --widths-for "$N"; python3 benchmarks/multi_gpu.py compare --dir $D --out "$OUT/nccl_check.md"; } \
      2>&1 | tail -60 > "$OUT/correctness_log.txt"; grep -v "^$" "$OUT/correctness_log.txt" | tail -12
  fi
  if [[ $what == demo || $what == all ]]; then
    D=/tmp/mgdemo; mkdir -p $D
    { stamp convert; [[ -d /tmp/demo_bf16 ]] || python3 -m dsv3.commands.main convert dsv3/demo_model /tmp/demo_bf16 --to bf16
      check_layouts $D --model /tmp/demo_bf16 --profile cuda-bf16
      python3 benchmarks/multi_gpu.py compare --dir $D --out "$OUT/nccl_check_demo.md"; } \
      2>&1 | tail -60 > "$OUT/demo_log.txt"; grep -v "^$" "$OUT/demo_log.txt" | tail -12
  fi
  if [[ $what == scaling || $what == all ]]; then
    for w in 1 $N; do
      stamp "bench ws$w"; timeout 200 torchrun --nproc-per-node $w --no-python python3 benchmarks/multi_gpu.py bench \
        --layers ${LAYERS:-8} --out "$OUT/scaling_ws$w.json" 2>&1 | grep -v "^\s*$" | tail -8
      echo "exit status ${PIPESTATUS[0]} (torchrun)"
    done
  fi
done
stamp done
