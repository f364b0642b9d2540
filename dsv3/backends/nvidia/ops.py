"""The `cuda` op table: the shared Triton kernels (dsv3.backends.triton) plus one NVIDIA choice.

FP8 linear dispatch: from M >= CUBLAS_MIN_M rows on, cuBLAS's block-scaled
FP8 GEMM (torch._scaled_mm with 1x128 activation and 128x128 weight scales, Hopper wgmma with
TMA and warp specialisation) runs near the FP8 peak (1,060-1,190 TFLOP/s at M=4096 measured here),
which Triton's `tl.dot` + per-K-step scaling does not reach (about 0.5-0.65x of it at M >= 512, see
benchmarks/results); so M >= 32 goes to cuBLAS when the shape is one it takes (kv_a's N = 576 is not). Below the threshold the step is bound by reading the weight, cuBLAS cannot do
M=1 and sits near 2x the weight-read floor at M<=16, and the split-K Triton kernel (activation
quantised inside it) is the faster choice. `dsv3-run bench` measures both columns.
"""
from __future__ import annotations

CUBLAS_MIN_M = 32   # measured (benchmarks/results): cuBLAS wins from M=64 on every V3 shape it takes


def cublas_takes(m: int, n: int, k: int, out_dtype) -> bool:
    """Shapes cuBLAS's block-scaled FP8 GEMM accepts: whole 128-blocks, K in multiples of 4 blocks
    (the scale tensors' 16-byte alignment), bf16 output."""
    import torch
    return out_dtype == torch.bfloat16 and n % 128 == 0 and k % 512 == 0 and m > 0


def cublas_linear(x, w):
    """y = x @ dequant(w)^T via torch._scaled_mm: x quantised 1x128 with column-major scales."""
    import torch
    from dsv3.backends.triton.quant import act_quant
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = act_quant(x2, w.data.dtype, w.ue8m0_acts, scale_column_major=True)
    y = torch._scaled_mm(xq, w.data.t(), scale_a=xs, scale_b=w.scale.t(), out_dtype=x.dtype)
    return y.view(*shape[:-1], w.out_features)


def cuda_target():
    import torch
    from dsv3.backends.triton import pdl
    from dsv3.backends.triton.tuning import Target, batch_invariant_requested
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    return Target("cuda", torch.float8_e4m3fn, num_sms=sms, batch_invariant=batch_invariant_requested(),
                  pdl=pdl.available())



def cuda_ops() -> dict:
    from dsv3.backends.triton.ops import make_ops, triton_linear
    target = cuda_target()

    rejected: set[tuple[int, int]] = set()   # (N, K) cuBLAS refused; decided once per weight shape

    def fp8_linear(x, w):
        m = x.numel() // x.shape[-1]
        shape = (w.out_features, w.in_features)
        if (m >= CUBLAS_MIN_M and not target.batch_invariant and shape not in rejected
                and cublas_takes(m, *shape, x.dtype)):
            try:
                return cublas_linear(x, w)
            except RuntimeError as e:
                # cuBLAS validates scale layouts on the host before launching anything; some sliced
                # shapes (seen: N = 256, K = 512 at tensor parallel 2) fail it. Triton takes every shape.
                if "Invalid scaling configuration" not in str(e):
                    raise
                rejected.add(shape)
        return triton_linear(target, x, w)

    return make_ops(target, fp8_linear)
