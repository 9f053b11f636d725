"""Triton kernels of the decoder's non-matmul layers (RMSNorm, SiLU(gate) * up, RoPE + KV-cache write + attention).

Shared by the low-bit and the fp16/bf16 decoder (:mod:`qalora.decoder`) so that both run the same non-matmul code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rmsnorm_kernel(h_ptr, w_ptr, out_ptr, eps, stride_h, stride_o, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    PDL: tl.constexpr):
    """out[r] = h[r] / rms(h[r]) * w. PDL: a programmatic dependent launch (the norm weight, which no kernel
    writes, is read before waiting for the kernel before it; the kernel after it may start at once)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    tl.store(out_ptr + row * stride_o + offs, (h * r * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(h: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """h fp32 [R, D], w [D] -> out [R, D] (out's dtype); ``pdl``: see ``_rmsnorm_kernel``."""
    r, d = h.shape
    _rmsnorm_kernel[(r,)](h, w, out, eps, h.stride(0), out.stride(0), D=d,
                          BLOCK_D=triton.next_power_of_2(d), PDL=pdl, num_warps=4,
                          **({"launch_pdl": True} if pdl else {}))
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
def _attn_decode_kernel(qkv_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, inv_freq_ptr, part_ptr, cnt_ptr,
                        stride_qb, stride_cb, stride_ch, stride_ob, scale,
                        H: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr,
                        SPLITS: tl.constexpr, PDL: tl.constexpr):
    """One new token per sequence: RoPE on q and k (rotate-half convention), attention over the
    cached positions [0, pos) plus the new token, k/v written to the cache at pos.

    qkv [B, (H + 2 HKV) DH] (q | k | v), caches [B, HKV, S_max, DH], out [B, H DH]; grid (B, H, SPLITS).
    With SPLITS > 1 program s attends to the s-th of SPLITS equal runs of [0, pos) only and leaves its
    partial (running max, sum, unnormalized output) in part fp32 [B, H, SPLITS, DH + 2]; the last
    program of (b, h) to finish (an acq_rel counter, cnt int32 [B, H], reset to 0 by that program)
    merges them with the new token and writes out and the cache. PDL: a programmatic dependent launch
    (it waits for the kernel before it before reading anything that kernel's predecessors wrote, and
    lets the kernel after it start at once).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    G: tl.constexpr = H // HKV
    HALF: tl.constexpr = DH // 2
    hk = h // G
    offs = tl.arange(0, HALF)
    inv_freq = tl.load(inv_freq_ptr + offs)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pos = tl.load(pos_ptr)
    ang = pos.to(tl.float32) * inv_freq
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    qb = qkv_ptr + b * stride_qb + h * DH
    q1 = tl.load(qb + offs).to(tl.float32)
    q2 = tl.load(qb + HALF + offs).to(tl.float32)
    qr1 = (q1 * cos - q2 * sin) * scale
    qr2 = (q2 * cos + q1 * sin) * scale
    kbase = kc_ptr + b * stride_cb + hk * stride_ch
    vbase = vc_ptr + b * stride_cb + hk * stride_ch
    lo = 0
    hi = pos
    if SPLITS > 1:
        chunk = tl.cdiv(pos, SPLITS)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, pos)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.full((), 0.0, tl.float32)
    acc1 = qr1 * 0.0
    acc2 = qr1 * 0.0
    for s0 in range(lo, hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < hi
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
    if SPLITS > 1:
        pb = part_ptr + ((b * H + h) * SPLITS + sp) * (DH + 2)
        tl.store(pb + offs, acc1)
        tl.store(pb + HALF + offs, acc2)
        tl.store(pb + DH, m)
        tl.store(pb + DH + 1, l)
        # release: the partial above is visible to whichever program sees the last count (acquire); triton
        # puts a CTA barrier on both sides of this scalar atomic (checked in the PTX), so every thread's
        # stores precede it and every thread's merge loads follow it
        done = tl.atomic_add(cnt_ptr + b * H + h, 1, sem="acq_rel")
        last = done == SPLITS - 1
    else:
        last = True
    if last:
        kb = qkv_ptr + b * stride_qb + (H + hk) * DH
        k1 = tl.load(kb + offs).to(tl.float32)
        k2 = tl.load(kb + HALF + offs).to(tl.float32)
        kr1 = (k1 * cos - k2 * sin).to(kc_ptr.dtype.element_ty)
        kr2 = (k2 * cos + k1 * sin).to(kc_ptr.dtype.element_ty)
        vb = qkv_ptr + b * stride_qb + (H + HKV + hk) * DH
        v1 = tl.load(vb + offs)
        v2 = tl.load(vb + HALF + offs)
        if SPLITS > 1:
            # merge in a fixed order (split 0, 1, ...), whichever program came last: same bits every run
            ps = part_ptr + ((b * H + h) * SPLITS + tl.arange(0, SPLITS)) * (DH + 2)  # [SPLITS]
            pm = tl.load(ps + DH, cache_modifier=".cg")  # .cg: L1 may hold an earlier step's partials
            pl = tl.load(ps + DH + 1, cache_modifier=".cg")
            pa1 = tl.load(ps[:, None] + offs[None, :], cache_modifier=".cg")
            pa2 = tl.load(ps[:, None] + HALF + offs[None, :], cache_modifier=".cg")
            m = tl.max(pm, axis=0)
            wgt = tl.where(pm == float("-inf"), 0.0, tl.exp(pm - m))  # empty splits weigh 0 (and no NaN)
            l = tl.sum(pl * wgt, axis=0)
            acc1 = tl.sum(pa1 * wgt[:, None], axis=0)
            acc2 = tl.sum(pa2 * wgt[:, None], axis=0)
            tl.store(cnt_ptr + b * H + h, 0)
        mk = tl.sum(qr1 * kr1.to(tl.float32) + qr2 * kr2.to(tl.float32), axis=0)  # the new token
        m_new = tl.maximum(m, mk)
        alpha = tl.exp(m - m_new)
        pk = tl.exp(mk - m_new)
        l = l * alpha + pk
        acc1 = acc1 * alpha + pk * v1.to(tl.float32)
        acc2 = acc2 * alpha + pk * v2.to(tl.float32)
        if h % G == 0:
            tl.store(kbase + pos * DH + offs, kr1)
            tl.store(kbase + pos * DH + HALF + offs, kr2)
            tl.store(vbase + pos * DH + offs, v1.to(vc_ptr.dtype.element_ty))
            tl.store(vbase + pos * DH + HALF + offs, v2.to(vc_ptr.dtype.element_ty))
        d1 = h * DH + offs
        ob = out_ptr + b * stride_ob
        tl.store(ob + d1, (acc1 / l).to(out_ptr.dtype.element_ty))
        tl.store(ob + d1 + HALF, (acc2 / l).to(out_ptr.dtype.element_ty))


@dataclass
class AttnScratch:
    """The split decode attention's partials (fp32 [B, H, splits, DH + 2]) and per-head counters (int32
    [B, H], zero between calls)."""

    part: torch.Tensor
    count: torch.Tensor

    @property
    def splits(self) -> int:
        return self.part.shape[2]


def attn_splits(batch: int, heads: int, max_seq: int, sms: int, chunk: int = 16) -> int:
    """Context splits per (sequence, head), a power of two: enough programs to fill the SMs twice, no split
    shorter than ``chunk`` positions; 1 when batch x heads already fills them. (H200, LLaMA-7B, B = 1, context
    128: 8 splits of 25 positions 5.68 us a layer against 5.79 with 4, and +3.0% INT4 decode; RESULTS round 11.)"""
    want = -(-2 * sms // (batch * heads))
    most = -(-max_seq // chunk)
    splits = 1
    while splits * 2 <= most and splits < want:  # a power of two (the merge's tl.arange)
        splits *= 2
    return splits


def attn_block_s(programs: int, max_seq: int, splits: int, sms: int) -> int:
    """Cached positions per loop step of the decode attention: 32 when the GPU holds over 6 programs per SM
    (they hide each other's latency), else the largest power of two in [32, 128] that a split's share of
    ``max_seq`` fills, so a program issues more of its loads at once. H200, LLaMA-7B, us a layer (RESULTS round
    11): B = 16 context 128 12.87 with 128 against 14.65 with 32, context 1024 70.1 against 86.5; B = 32
    (7.8 programs per SM) 21.7 with 32 against 23.8 with 128."""
    if programs > 6 * sms:
        return 32
    span = max(1, max_seq // splits)
    return max(32, min(128, 1 << (span.bit_length() - 1)))


def attn_scratch(batch: int, heads: int, head_dim: int, splits: int, device: torch.device) -> AttnScratch | None:
    if splits <= 1:
        return None
    return AttnScratch(torch.empty(batch, heads, splits, head_dim + 2, device=device),
                       torch.zeros(batch, heads, dtype=torch.int32, device=device))


def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                pos: torch.Tensor, inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int,
                scratch: AttnScratch | None = None, block_s: int | None = None, num_warps: int = 2,
                pdl: bool = False) -> torch.Tensor:
    """See ``_attn_decode_kernel``; ``pos`` is an int32 [1] device tensor (graph-replayable). ``scratch``
    (:func:`attn_scratch`) splits the cached context over ``scratch.splits`` programs per head.

    ``block_s`` (positions per loop step) defaults to :func:`attn_block_s`; 2 warps: the fastest on an H200
    for B = 1/8/16/32 at context 128 and 1024 (benchmarks/RESULTS.md, rounds 5 and 11)."""
    b = qkv.shape[0]
    dh = k_cache.shape[-1]
    splits = 1 if scratch is None else scratch.splits
    if block_s is None:
        block_s = attn_block_s(b * n_heads * splits, k_cache.shape[2], splits,
                               torch.cuda.get_device_properties(qkv.device).multi_processor_count)
    part, cnt = (out, pos) if scratch is None else (scratch.part, scratch.count)
    _attn_decode_kernel[(b, n_heads, splits)](
        qkv, k_cache, v_cache, out, pos, inv_freq, part, cnt, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), dh ** -0.5, H=n_heads, HKV=n_kv_heads, DH=dh, BLOCK_S=block_s, SPLITS=splits,
        PDL=pdl, num_warps=num_warps, **({"launch_pdl": True} if pdl else {}),
    )
    return out
