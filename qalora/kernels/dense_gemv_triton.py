"""Triton kernels of the dense fp16/bf16 GEMV twin (the benchmark's fused bf16 baseline); imported lazily.

``_dense_gemv_kernel`` runs the same prologues/epilogues as the low-bit CUDA kernels (RMSNorm on
an fp32 residual stream, SiLU(gate) * up, residual add), so the dense model can run the same fused
static decoder (:mod:`qalora.decoder`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rstd(x_ptr, row_off, row_mask, eps, K: tl.constexpr, AXIS: tl.constexpr):
    """1/rms of fp32 rows: row_off/row_mask [R, 1] (AXIS 1) or scalars (AXIS 0, returns [1])."""
    CH: tl.constexpr = 512
    if AXIS == 1:
        ss = tl.zeros([row_off.shape[0]], tl.float32)
        for k0 in tl.range(0, K, CH):
            offs = k0 + tl.arange(0, CH)
            v = tl.load(x_ptr + row_off + offs[None, :], mask=row_mask & (offs < K)[None, :], other=0.0)
            ss += tl.sum(v * v, axis=1)
        r = tl.rsqrt(ss / K + eps)[:, None]
    else:
        ss = tl.zeros([CH], tl.float32)
        for k0 in tl.range(0, K, CH):
            offs = k0 + tl.arange(0, CH)
            v = tl.load(x_ptr + row_off + offs, mask=offs < K, other=0.0)
            ss += v * v
        r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps) + tl.zeros([1], tl.float32)
    return r


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, out_ptr, nw_ptr, M, N, stride_xm, stride_wn, stride_om, x_half, eps,
                       K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, ATOMIC: tl.constexpr,
                       DOT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """out[m, n] (+)= sum_k f(x)[m, k] w[n, k]; grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    KPS: tl.constexpr = ((K + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = pid_k * KPS
    k_hi = tl.minimum(k_lo + KPS, K)
    if DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m + tl.arange(0, 1)
    m_mask = offs_m < M
    if NORM:
        rstd = _rstd(x_ptr, offs_m[:, None] * stride_xm, m_mask[:, None], eps, K, 1)  # [BM, 1]
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xp = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        xmask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
        if ACT:
            u = tl.load(xp + x_half, mask=xmask, other=0.0).to(tl.float32)
            x = x / (1.0 + tl.exp(-x)) * u
        if NORM:
            x = x * rstd * tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        if DOT:
            acc = tl.dot(w, tl.trans(x.to(DOT_DTYPE)), acc)
        else:
            acc2 += w.to(tl.float32) * x
    if DOT:
        y = acc
    else:
        y = tl.sum(acc2, axis=1)[:, None]
    optr = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    omask = n_mask[:, None] & m_mask[None, :]
    if ATOMIC:
        tl.atomic_add(optr, y, mask=omask, sem="relaxed")
    else:
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)
