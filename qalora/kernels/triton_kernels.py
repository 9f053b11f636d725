"""Triton kernels for the plane layout (see :mod:`qalora.kernels.layout`); imported lazily.

Three kernels share one decoder:

- ``_gemv_kernel``: skinny x (M small). M == 1 runs on FMA units with per-block partial sums
  (3 instructions per code: shift, mask|magic, fma); M > 1 dequantizes each slot to the
  activation dtype and uses tensor cores (``tl.dot``). Optional split-K with fp32 atomics
  (adds straight into an fp32 residual stream), an optional SiLU(gate)*up prologue and
  slot-major ("permuted") activations for vectorized loads.
- ``_gemm_kernel``: large M, dequantize a [BN, BK] tile in registers and ``tl.dot``.
- ``_dequant_kernel``: the full weight in the activation dtype (for dequant + cuBLAS).

A code q is decoded without int->float conversion: its bits are moved to the top of an fp32
mantissa with exponent 0, giving v = 1 + q / 2^bits exactly; W = coef0 * v + coef1.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _shift(w, SRC: tl.constexpr, DST: tl.constexpr):
    """Move bit SRC of int32 ``w`` to bit DST (other bits garbage; callers mask)."""
    if SRC < DST:
        r = w << (DST - SRC)
    elif SRC > DST:
        r = w >> (SRC - DST)
    else:
        r = w
    return r


@triton.jit
def _magic(t, MASK: tl.constexpr):
    """fp32 with mantissa bits ``t & MASK`` and exponent 0 (value 1 + mantissa)."""
    return ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _slot(w0, w1, w2, w3, C: tl.constexpr, BITS: tl.constexpr):
    """v = 1 + q/2^BITS (fp32) for code slot C (0..31) of each block, from its plane words."""
    TGT: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << TGT
    if BITS == 4:
        P: tl.constexpr = C // 8
        S: tl.constexpr = 4 * (C % 8)
        if P == 0:
            w = w0
        elif P == 1:
            w = w1
        elif P == 2:
            w = w2
        else:
            w = w3
        v = _magic(_shift(w, S, TGT), MASK)
    elif BITS == 2:
        P2: tl.constexpr = C // 16
        S2: tl.constexpr = 2 * (C % 16)
        if P2 == 0:
            w = w0
        else:
            w = w1
        v = _magic(_shift(w, S2, TGT), MASK)
    else:  # 3 bit: 10 codes per word, codes 30 and 31 in the spare top bits
        if C < 30:
            P3: tl.constexpr = C // 10
            S3: tl.constexpr = 3 * (C % 10)
            if P3 == 0:
                w = w0
            elif P3 == 1:
                w = w1
            else:
                w = w2
            v = _magic(_shift(w, S3, TGT), MASK)
        elif C == 30:
            t = (_shift(w0, 30, 20) & 0x00300000) | (_shift(w1, 30, 22) & 0x00400000)
            v = _magic(t, MASK)
        else:
            t = (_shift(w1, 31, 20) & 0x00100000) | (_shift(w2, 30, 21) & 0x00600000)
            v = _magic(t, MASK)
    return v


@triton.jit
def _load_planes(w_ptr, offs_n, offs_b, mask, plane_stride, stride_wn, BITS: tl.constexpr):
    wp = w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :]
    w0 = tl.load(wp, mask=mask, other=0)
    w1 = tl.load(wp + plane_stride, mask=mask, other=0)
    if BITS >= 3:
        w2 = tl.load(wp + 2 * plane_stride, mask=mask, other=0)
    else:
        w2 = w0
    if BITS == 4:
        w3 = tl.load(wp + 3 * plane_stride, mask=mask, other=0)
    else:
        w3 = w0
    return w0, w1, w2, w3


@triton.jit
def _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB: tl.constexpr):
    cp = coef_ptr + (offs_b // GPB)[None, :] * N + offs_n[:, None]
    c0 = tl.load(cp, mask=mask, other=0.0)
    c1 = tl.load(cp + L * N, mask=mask, other=0.0)
    return c0, c1


@triton.jit
def _load_x(x_ptr, row_off, offs_b, c, mask, x_half, NBT: tl.constexpr, X_PERM: tl.constexpr,
            ACT: tl.constexpr):
    """Activation slot c of blocks offs_b (fp32); ACT: silu(gate) * up with up at +x_half."""
    if X_PERM:
        ptr = x_ptr + row_off + c * NBT + offs_b
    else:
        ptr = x_ptr + row_off + offs_b * 32 + c
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        u = tl.load(ptr + x_half, mask=mask, other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * u
    return x


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
def _gemv_kernel(x_ptr, w_ptr, coef_ptr, bias_ptr, out_ptr, nw_ptr, one_ptr,
                 M, N, stride_xm, stride_om, plane_stride, stride_wn, x_half, eps,
                 NBT: tl.constexpr, BITS: tl.constexpr, GPB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT_K: tl.constexpr,
                 X_PERM: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, ATOMIC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PREFETCH: tl.constexpr = False, SCALAR: tl.constexpr = False):
    """out[m, n] (+)= sum_k x[m, k] W[n, k]; grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)).

    NORM: x is an fp32 residual stream and the kernel's input is rmsnorm(x) * nw (nw laid out
    like x), the row's rms computed in a prologue. PREFETCH (M == 1 path): the next iteration's
    words are loaded before this one's math. SCALAR: weight offsets are multiplied by a value
    loaded from ``one_ptr`` (== 1) so the compiler cannot vectorize along blocks; a warp then
    spans 32 blocks of one row and each thread holds several rows, reusing its activations.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    L: tl.constexpr = NBT // GPB
    BPS: tl.constexpr = ((NBT + SPLIT_K - 1) // SPLIT_K + NB - 1) // NB * NB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_lo = pid_k * BPS
    b_hi = tl.minimum(b_lo + BPS, NBT)
    if DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if NORM:
            rstd = _rstd(x_ptr, offs_m[:, None] * stride_xm, m_mask[:, None], eps, NBT * 32, 1)
        for b0 in range(b_lo, b_hi, NB):
            offs_b = b0 + tl.arange(0, NB)
            b_mask = offs_b < b_hi
            mask = n_mask[:, None] & b_mask[None, :]
            w0, w1, w2, w3 = _load_planes(w_ptr, offs_n, offs_b, mask, plane_stride, stride_wn, BITS)
            c0, c1 = _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB)
            xmask = m_mask[:, None] & b_mask[None, :]
            for c in tl.static_range(32):
                xc = _load_x(x_ptr, offs_m[:, None] * stride_xm, offs_b[None, :], c, xmask, x_half,
                             NBT, X_PERM, ACT)
                if NORM:
                    xc = xc * rstd * _load_x(nw_ptr, 0, offs_b[None, :], c, b_mask[None, :], 0, NBT, X_PERM, False)
                xc = xc.to(DOT_DTYPE)
                wd = (c0 * _slot(w0, w1, w2, w3, c, BITS) + c1).to(DOT_DTYPE)
                acc = tl.dot(wd, tl.trans(xc), acc)
        y = acc
    else:
        offs_m = pid_m + tl.arange(0, 1)
        m_mask = offs_m < M
        row = pid_m * stride_xm
        acc = tl.zeros([BLOCK_N, NB], tl.float32)
        if NORM:
            rstd = tl.sum(_rstd(x_ptr, row, True, eps, NBT * 32, 0), axis=0)
        if SCALAR:
            unit = tl.load(one_ptr)
        else:
            unit = 1
        offs_b = b_lo + tl.arange(0, NB)
        b_mask = offs_b < b_hi
        mask = n_mask[:, None] & b_mask[None, :]
        w0, w1, w2, w3 = _load_planes(w_ptr, offs_n, offs_b * unit, mask, plane_stride, stride_wn, BITS)
        c0, c1 = _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB)
        for b0 in range(b_lo, b_hi, NB):
            if PREFETCH:
                nb_offs = offs_b + NB
                nb_mask = nb_offs < b_hi
                nmask = n_mask[:, None] & nb_mask[None, :]
                n0, n1, n2, n3 = _load_planes(w_ptr, offs_n, nb_offs * unit, nmask, plane_stride, stride_wn, BITS)
                d0, d1 = _load_coef(coef_ptr, offs_n, nb_offs, nmask, N, L, GPB)
            p = tl.zeros([BLOCK_N, NB], tl.float32)
            s = tl.zeros([NB], tl.float32)
            for c in tl.static_range(32):
                xc = _load_x(x_ptr, row, offs_b, c, b_mask, x_half, NBT, X_PERM, ACT)
                if NORM:
                    xc = xc * rstd * _load_x(nw_ptr, 0, offs_b, c, b_mask, 0, NBT, X_PERM, False)
                p += _slot(w0, w1, w2, w3, c, BITS) * xc[None, :]
                s += xc
            acc += c0 * p + c1 * s[None, :]
            if PREFETCH:
                w0, w1, w2, w3, c0, c1 = n0, n1, n2, n3, d0, d1
                offs_b, b_mask = nb_offs, nb_mask
            else:
                offs_b = offs_b + NB
                b_mask = offs_b < b_hi
                mask = n_mask[:, None] & b_mask[None, :]
                w0, w1, w2, w3 = _load_planes(w_ptr, offs_n, offs_b * unit, mask, plane_stride, stride_wn, BITS)
                c0, c1 = _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB)
        y = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)[:, None]
    optr = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    omask = n_mask[:, None] & m_mask[None, :]
    if ATOMIC:
        tl.atomic_add(optr, y, mask=omask, sem="relaxed")
    else:
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dequant_tile(w0, w1, w2, w3, c0, c1, BITS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Plane words [BN, NB] x4 and coef [BN, NB] x2 -> dequantized [BN, NB*32] in natural column order."""
    s0 = (c0 * _slot(w0, w1, w2, w3, 0, BITS) + c1).to(OUT_DTYPE)
    s1 = (c0 * _slot(w0, w1, w2, w3, 1, BITS) + c1).to(OUT_DTYPE)
    s2 = (c0 * _slot(w0, w1, w2, w3, 2, BITS) + c1).to(OUT_DTYPE)
    s3 = (c0 * _slot(w0, w1, w2, w3, 3, BITS) + c1).to(OUT_DTYPE)
    s4 = (c0 * _slot(w0, w1, w2, w3, 4, BITS) + c1).to(OUT_DTYPE)
    s5 = (c0 * _slot(w0, w1, w2, w3, 5, BITS) + c1).to(OUT_DTYPE)
    s6 = (c0 * _slot(w0, w1, w2, w3, 6, BITS) + c1).to(OUT_DTYPE)
    s7 = (c0 * _slot(w0, w1, w2, w3, 7, BITS) + c1).to(OUT_DTYPE)
    s8 = (c0 * _slot(w0, w1, w2, w3, 8, BITS) + c1).to(OUT_DTYPE)
    s9 = (c0 * _slot(w0, w1, w2, w3, 9, BITS) + c1).to(OUT_DTYPE)
    s10 = (c0 * _slot(w0, w1, w2, w3, 10, BITS) + c1).to(OUT_DTYPE)
    s11 = (c0 * _slot(w0, w1, w2, w3, 11, BITS) + c1).to(OUT_DTYPE)
    s12 = (c0 * _slot(w0, w1, w2, w3, 12, BITS) + c1).to(OUT_DTYPE)
    s13 = (c0 * _slot(w0, w1, w2, w3, 13, BITS) + c1).to(OUT_DTYPE)
    s14 = (c0 * _slot(w0, w1, w2, w3, 14, BITS) + c1).to(OUT_DTYPE)
    s15 = (c0 * _slot(w0, w1, w2, w3, 15, BITS) + c1).to(OUT_DTYPE)
    s16 = (c0 * _slot(w0, w1, w2, w3, 16, BITS) + c1).to(OUT_DTYPE)
    s17 = (c0 * _slot(w0, w1, w2, w3, 17, BITS) + c1).to(OUT_DTYPE)
    s18 = (c0 * _slot(w0, w1, w2, w3, 18, BITS) + c1).to(OUT_DTYPE)
    s19 = (c0 * _slot(w0, w1, w2, w3, 19, BITS) + c1).to(OUT_DTYPE)
    s20 = (c0 * _slot(w0, w1, w2, w3, 20, BITS) + c1).to(OUT_DTYPE)
    s21 = (c0 * _slot(w0, w1, w2, w3, 21, BITS) + c1).to(OUT_DTYPE)
    s22 = (c0 * _slot(w0, w1, w2, w3, 22, BITS) + c1).to(OUT_DTYPE)
    s23 = (c0 * _slot(w0, w1, w2, w3, 23, BITS) + c1).to(OUT_DTYPE)
    s24 = (c0 * _slot(w0, w1, w2, w3, 24, BITS) + c1).to(OUT_DTYPE)
    s25 = (c0 * _slot(w0, w1, w2, w3, 25, BITS) + c1).to(OUT_DTYPE)
    s26 = (c0 * _slot(w0, w1, w2, w3, 26, BITS) + c1).to(OUT_DTYPE)
    s27 = (c0 * _slot(w0, w1, w2, w3, 27, BITS) + c1).to(OUT_DTYPE)
    s28 = (c0 * _slot(w0, w1, w2, w3, 28, BITS) + c1).to(OUT_DTYPE)
    s29 = (c0 * _slot(w0, w1, w2, w3, 29, BITS) + c1).to(OUT_DTYPE)
    s30 = (c0 * _slot(w0, w1, w2, w3, 30, BITS) + c1).to(OUT_DTYPE)
    s31 = (c0 * _slot(w0, w1, w2, w3, 31, BITS) + c1).to(OUT_DTYPE)
    t = tl.join(tl.join(tl.join(tl.join(tl.join(s0, s16), tl.join(s8, s24)), tl.join(tl.join(s4, s20), tl.join(s12, s28))), tl.join(tl.join(tl.join(s2, s18), tl.join(s10, s26)), tl.join(tl.join(s6, s22), tl.join(s14, s30)))), tl.join(tl.join(tl.join(tl.join(s1, s17), tl.join(s9, s25)), tl.join(tl.join(s5, s21), tl.join(s13, s29))), tl.join(tl.join(tl.join(s3, s19), tl.join(s11, s27)), tl.join(tl.join(s7, s23), tl.join(s15, s31)))))
    return tl.reshape(t, (t.shape[0], t.shape[1] * 32))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, coef_ptr, bias_ptr, out_ptr,
                 M, N, stride_xm, stride_om, plane_stride, stride_wn,
                 NBT: tl.constexpr, BITS: tl.constexpr, GPB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, GROUP_M: tl.constexpr,
                 SWAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[M, N] = x[M, K] @ W^T with W dequantized tile by tile; 1-D grid, grouped ordering."""
    L: tl.constexpr = NBT // GPB
    BK: tl.constexpr = NB * 32
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % gm
    pid_n = (pid % per_group) // gm
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b0 in range(0, NBT, NB):
        offs_b = b0 + tl.arange(0, NB)
        b_mask = offs_b < NBT
        mask = n_mask[:, None] & b_mask[None, :]
        w0, w1, w2, w3 = _load_planes(w_ptr, offs_n, offs_b, mask, plane_stride, stride_wn, BITS)
        c0, c1 = _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB)
        wd = _dequant_tile(w0, w1, w2, w3, c0, c1, BITS, x_ptr.dtype.element_ty)  # [BN, BK]
        offs_k = b0 * 32 + tl.arange(0, BK)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k < NBT * 32)[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(wd, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(wd), acc)
    if SWAP:
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        optr = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        optr = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(w_ptr, coef_ptr, out_ptr, N, plane_stride, stride_wn,
                    NBT: tl.constexpr, BITS: tl.constexpr, GPB: tl.constexpr,
                    BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """out[N, K] = W in out's dtype; grid (cdiv(N, BLOCK_N), cdiv(NBT, NB))."""
    L: tl.constexpr = NBT // GPB
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * NB + tl.arange(0, NB)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_b < NBT)[None, :]
    w0, w1, w2, w3 = _load_planes(w_ptr, offs_n, offs_b, mask, plane_stride, stride_wn, BITS)
    c0, c1 = _load_coef(coef_ptr, offs_n, offs_b, mask, N, L, GPB)
    wd = _dequant_tile(w0, w1, w2, w3, c0, c1, BITS, out_ptr.dtype.element_ty)
    offs_k = tl.program_id(1) * NB * 32 + tl.arange(0, NB * 32)
    tl.store(out_ptr + offs_n[:, None] * (NBT * 32) + offs_k[None, :], wd,
             mask=n_mask[:, None] & (offs_k < NBT * 32)[None, :])


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, out_ptr, nw_ptr, M, N, stride_xm, stride_wn, stride_om, x_half, eps,
                       K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, ATOMIC: tl.constexpr,
                       DOT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The fp16/bf16 twin of ``_gemv_kernel`` (same prologues/epilogues, natural layout) so the
    dense baseline can run the same fused decode harness."""
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
