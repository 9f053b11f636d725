"""Triton kernels of the decoder's non-matmul layers (RMSNorm, SiLU(gate) * up, RoPE + KV-cache write + attention).

Shared by the low-bit and the fp16/bf16 decoder (:mod:`qalora.decoder`) so that both run the same non-matmul code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(h_ptr, w_ptr, out_ptr, eps, stride_h, stride_o, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = h[r] / rms(h[r]) * w."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (h * r * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(h: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """h fp32 [R, D], w [D] -> out [R, D] (out's dtype)."""
    r, d = h.shape
    _rmsnorm_kernel[(r,)](h, w, out, eps, h.stride(0), out.stride(0), D=d,
                          BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, F: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + F + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """gu [R, 2F] = [gate | up] -> out [R, F] = silu(gate) * up."""
    r, f2 = gu.shape
    f = f2 // 2
    block = 1024
    _silu_mul_kernel[(r, triton.cdiv(f, block))](gu, out, gu.stride(0), out.stride(0), F=f, BLOCK=block,
                                                 num_warps=4)
    return out


@triton.jit
def _attn_decode_kernel(qkv_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, inv_freq_ptr,
                        stride_qb, stride_cb, stride_ch, stride_ob, scale,
                        H: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr):
    """One new token per sequence: RoPE on q and k (rotate-half convention), attention over the
    cached positions [0, pos) plus the new token, k/v written to the cache at pos.

    qkv [B, (H + 2 HKV) DH] (q | k | v), caches [B, HKV, S_max, DH], out [B, H DH]; grid (B, H).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    G: tl.constexpr = H // HKV
    HALF: tl.constexpr = DH // 2
    hk = h // G
    pos = tl.load(pos_ptr)
    offs = tl.arange(0, HALF)
    ang = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs)
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    qb = qkv_ptr + b * stride_qb + h * DH
    q1 = tl.load(qb + offs).to(tl.float32)
    q2 = tl.load(qb + HALF + offs).to(tl.float32)
    qr1 = (q1 * cos - q2 * sin) * scale
    qr2 = (q2 * cos + q1 * sin) * scale
    kb = qkv_ptr + b * stride_qb + (H + hk) * DH
    k1 = tl.load(kb + offs).to(tl.float32)
    k2 = tl.load(kb + HALF + offs).to(tl.float32)
    kr1 = (k1 * cos - k2 * sin).to(kc_ptr.dtype.element_ty)
    kr2 = (k2 * cos + k1 * sin).to(kc_ptr.dtype.element_ty)
    vb = qkv_ptr + b * stride_qb + (H + HKV + hk) * DH
    v1 = tl.load(vb + offs)
    v2 = tl.load(vb + HALF + offs)
    m = tl.sum(qr1 * kr1.to(tl.float32) + qr2 * kr2.to(tl.float32), axis=0)
    l = m * 0.0 + 1.0
    acc1 = v1.to(tl.float32)
    acc2 = v2.to(tl.float32)
    kbase = kc_ptr + b * stride_cb + hk * stride_ch
    vbase = vc_ptr + b * stride_cb + hk * stride_ch
    for s0 in range(0, pos, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < pos
        kp = kbase + offs_s[:, None] * DH + offs[None, :]
        kc1 = tl.load(kp, mask=smask[:, None], other=0.0).to(tl.float32)
        kc2 = tl.load(kp + HALF, mask=smask[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(kc1 * qr1[None, :] + kc2 * qr2[None, :], axis=1)
        sc = tl.where(smask, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        vp = vbase + offs_s[:, None] * DH + offs[None, :]
        vc1 = tl.load(vp, mask=smask[:, None], other=0.0).to(tl.float32)
        vc2 = tl.load(vp + HALF, mask=smask[:, None], other=0.0).to(tl.float32)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * vc1, axis=0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * vc2, axis=0)
        m = m_new
    if h % G == 0:
        tl.store(kbase + pos * DH + offs, kr1)
        tl.store(kbase + pos * DH + HALF + offs, kr2)
        tl.store(vbase + pos * DH + offs, v1.to(vc_ptr.dtype.element_ty))
        tl.store(vbase + pos * DH + HALF + offs, v2.to(vc_ptr.dtype.element_ty))
    d1 = h * DH + offs
    ob = out_ptr + b * stride_ob
    tl.store(ob + d1, (acc1 / l).to(out_ptr.dtype.element_ty))
    tl.store(ob + d1 + HALF, (acc2 / l).to(out_ptr.dtype.element_ty))


def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                pos: torch.Tensor, inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int,
                block_s: int = 64) -> torch.Tensor:
    """See ``_attn_decode_kernel``; ``pos`` is an int32 [1] device tensor (graph-replayable)."""
    b = qkv.shape[0]
    dh = k_cache.shape[-1]
    _attn_decode_kernel[(b, n_heads)](
        qkv, k_cache, v_cache, out, pos, inv_freq, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), dh ** -0.5, H=n_heads, HKV=n_kv_heads, DH=dh, BLOCK_S=block_s,
        num_warps=4,
    )
    return out
