#!/usr/bin/env bash
# Multi-GPU device calls (nvidia-h200-x2): NCCL correctness against world size 1, speculative decoding,
# and tensor/expert-parallel scaling. Results land in $OUT.
#   bash benchmarks/gpu_x2_session.sh [correctness|scaling|all]   (default all)
set -u
OUT=${OUT:-/tmp/dsv3-x2}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
stamp() { echo "== $(date +%T) $*"; }
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"; } 2>&1 | tee "$OUT/env.txt"
D=/tmp/mg; mkdir -p $D
what=${1:-all}
if [[ $what == correctness || $what == all ]]; then
  {
    stamp single; timeout 150 python3 benchmarks/multi_gpu.py check --dir $D
    stamp ws1; timeout 90 torchrun --nproc-per-node 1 --no-python python3 benchmarks/multi_gpu.py check --dir $D
    for layout in "2 2" "2 1" "1 2"; do set -- $layout
      stamp "ws2 tp$1 ep$2"; timeout 90 torchrun --nproc-per-node 2 --no-python python3 benchmarks/multi_gpu.py check --dir $D --tp $1 --ep $2
    done
    stamp compare; python3 benchmarks/multi_gpu.py compare --dir $D --out "$OUT/nccl_check.md"
  } 2>&1 | tail -60 > "$OUT/correctness_log.txt"; cat "$OUT/correctness_log.txt" | grep -v "^$" | tail -25
  stamp spec; timeout 150 python3 benchmarks/speculative_decode.py --layers 4 --batches 1 8 --k 1 --new-tokens 48 2>&1 | tail -20 | tee "$OUT/speculative.md"
fi
if [[ $what == fp32 ]]; then   # tensor parallel in float32: layouts differ only in reduction order
  D=/tmp/mg32; mkdir -p $D
  {
    stamp single; timeout 100 python3 benchmarks/multi_gpu.py check --dir $D --dtype float32 --all-experts
    for layout in "2 2" "2 1"; do set -- $layout
      stamp "ws2 tp$1 ep$2"; timeout 60 torchrun --nproc-per-node 2 --no-python python3 benchmarks/multi_gpu.py check --dir $D --tp $1 --ep $2 --dtype float32
    done
    stamp compare; python3 benchmarks/multi_gpu.py compare --dir $D --out "$OUT/nccl_check_fp32.md"
  } 2>&1 | tail -40 > "$OUT/fp32_log.txt"; grep -v "^$" "$OUT/fp32_log.txt" | tail -12
fi
if [[ $what == scaling || $what == all ]]; then
  for w in 1 2; do
    stamp "bench ws$w"; timeout 150 torchrun --nproc-per-node $w --no-python python3 benchmarks/multi_gpu.py bench --layers 8 --out "$OUT/scaling_ws$w.json" 2>&1 | grep -v "^\s*$" | tail -12
  done
  stamp serve; timeout 100 python3 benchmarks/serve_load.py --full-width-layers 4 --backend cuda --rates 8,32,inf --prompt-len 256 --output-len 64 --num-requests 96 --static-batch 32 --modes static,continuous --out "$OUT/serve_gpu.md" 2>&1 | tail -14
fi
stamp done
