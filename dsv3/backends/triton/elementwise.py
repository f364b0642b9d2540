"""Small memory-bound ops: RoPE (interleaved pairs), SiLU*up, the latent-cache write."""
import torch
import triton
import triton.language as tl

from dsv3.backends.triton import pdl


@triton.jit
def rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, y_ptr, H, stride_xt, stride_xh, stride_yt, stride_yh,
                stride_cos, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """x [T, H, 2*HALF] (any strides, last dim contiguous) -> y contiguous; pair i = (x[2i], x[2i+1])."""
    pdl.start(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_P)
    mask = (h[:, None] < H) & (i[None, :] < HALF)
    pos = tl.load(pos_ptr + t)
    c = tl.load(cos_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0)[None, :]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + 2 * i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    dst = y_ptr + t * stride_yt + h[:, None] * stride_yh + 2 * i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + 1, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def rope(x, positions, cos, sin, launch_pdl=False):
    t, nh, r = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((t, nh, r), dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    block_h = min(16, triton.next_power_of_2(nh))
    rope_kernel[(t, triton.cdiv(nh, block_h))](
        x, positions, cos, sin, y, nh, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0),
        HALF=r // 2, BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(r // 2), **pdl.launch_options(launch_pdl),
        num_warps=4)
    return y


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, stride_g, stride_u, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate, up, launch_pdl=False):
    shape = gate.shape
    g, u = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    t, n = g.shape
    y = torch.empty((t, n), dtype=gate.dtype, device=gate.device)
    if t:
        block = min(2048, triton.next_power_of_2(n))
        silu_mul_kernel[(t, triton.cdiv(n, block))](g, u, y, n, g.stride(0), u.stride(0), y.stride(0),
                                                    BLOCK=block, **pdl.launch_options(launch_pdl), num_warps=4)
    return y.view(shape)


@triton.jit
def write_latent_cache_kernel(cache_ptr, lat_ptr, rope_ptr, slot_ptr, stride_slot, stride_lat, stride_rope,
                              C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                              PDL: tl.constexpr):
    """A negative slot writes nothing: CUDA-graph padding rows use it (dsv3.backends.nvidia.graphs)."""
    pdl.start(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = cache_ptr + tl.maximum(slot, 0) * stride_slot
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    cm = c < tl.where(slot >= 0, C, 0)
    rm = r < tl.where(slot >= 0, R, 0)
    lat = tl.load(lat_ptr + t * stride_lat + c, mask=cm)
    rp = tl.load(rope_ptr + t * stride_rope + r, mask=rm)
    tl.store(dst + c, lat.to(cache_ptr.dtype.element_ty), mask=cm)
    tl.store(dst + C + r, rp.to(cache_ptr.dtype.element_ty), mask=rm)


def write_latent_cache(cache, latent, k_rope, slots, launch_pdl=False):
    t, c = latent.shape
    r = k_rope.shape[-1]
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    if k_rope.stride(-1) != 1:
        k_rope = k_rope.contiguous()
    if t:
        write_latent_cache_kernel[(t,)](cache, latent, k_rope, slots, cache.stride(1), latent.stride(0),
                                        k_rope.stride(0), C=c, R=r, BLOCK_C=triton.next_power_of_2(c),
                                        BLOCK_R=triton.next_power_of_2(r), **pdl.launch_options(launch_pdl),
                                        num_warps=4)
