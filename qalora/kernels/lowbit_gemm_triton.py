"""A fused large-M low-bit GEMM: codes dequantized in registers on their way to the tensor cores
(``tl.dot``: wgmma on Hopper), straight from the skinny kernel's tile layout, so the bf16/fp16 weight is
never written to memory (dequantize-then-cuBLAS writes and re-reads it: 4 bytes per weight on top of the
0.5 it needs).

Opt-in (``gpu_matmul.matmul(x, w, large_m="fused")``), not the default (the CUDA ``lowbit_gemm.cu`` takes the
dequantized weight as wgmma's register operand instead): on an H200 it runs 1.4-2.4x slower
than dequantize + cuBLAS on LLaMA-7B shapes at M = 256-2048 (at M = 64: 10-20% faster on qkv and gate_up,
2.5-2.9x slower on o and down; benchmarks/RESULTS.md, round 5). ncu says
why: each K step stores the dequantized operand to shared memory behind a CTA barrier, then waits for its
wgmma (barrier and short-scoreboard stalls lead), with 2 CTAs per SM at ~130-250 registers, 0.36 issued
instructions per cycle, DRAM 3% busy. Closing it takes producer/consumer warp specialization (dequantizing
warps feeding an MMA warpgroup through an mbarrier ring), which this Triton version does not generate here.

Reading the tile layout (:mod:`qalora.kernels.layout`) without shuffling it. One 128-word chunk of a
(tile, step) holds the codes of the tile's 16 rows over ``KC = 256 / bits`` columns (64 at 4 bit, 128 at
2 bit). Its word ``16 g + 4 t + e`` (lane 4 g + t, word e of the lane's chunk) holds, for row g (r = 0)
and row g + 8 (r = 1), the codes of 16 / bits columns each, at bit ``bits (2 (q >> 1) + r) + 16 (q & 1)``
for the q-th of them. The kernel reads a row pair's 16 words in the order that decodes to consecutive
columns and unpacks them into two ``[KC, 8 tiles]`` operands, one per r, in natural K order. Rows r = 0
and r = 1 of a tile land in two accumulators (or in alternate columns of one, ``join``), so a ``glu`` weight (blocks of 8 gate rows then the 8 matching up rows) finishes as
silu(acc0) * acc1 without a pass over its output.

Takes 2- and 4-bit weights whose group holds whole chunks (group >= KC); 3-bit chunks do not split
into whole words per row pair, and smaller groups would need a scale per column: those keep the
dequantize-then-cuBLAS path (:func:`qalora.kernels.gpu_matmul.dequant_matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qalora.kernels.layout import STEP_K

GEMM_BITS = (2, 4)


def chunk_cols(bits: int) -> int:
    """Columns of one 128-word chunk of a (tile, step): 64 at 4 bit, 128 at 2 bit."""
    return STEP_K // bits


def gemm_fits(bits: int, group_size: int) -> bool:
    """Whether :func:`lowbit_gemm` takes this layout (module doc)."""
    return bits in GEMM_BITS and group_size >= chunk_cols(bits)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128  # rows of x per program
    block_t: int = 8  # 16-row weight tiles per program (N = 16 block_t)
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # programs along M that run next to each other (weights re-read from L2)
    chunks: int = 1  # 128-word chunks per step of the K loop (BLOCK_K = chunks * 256 / bits)
    join: bool = False  # one MMA over both rows of each pair instead of one per row


DEFAULT_CONFIG = GemmConfig()


def gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """The config for an [m, k] x [k, n] problem: the fastest in the H200 sweep (``benchmarks/kernel_sweep.py``,
    round 5) at M = 512 on qkv and o (128/8/4 warps/3 stages; gate_up and down within 11%) and at M = 2048 on
    every shape (256/8/8/3)."""
    if m >= 1024:
        return GemmConfig(block_m=256, block_t=8, num_warps=8, num_stages=3)
    return DEFAULT_CONFIG  # 128/8/4/3


@triton.jit
def _lowbit_gemm_kernel(
    x_ptr, tiles_ptr, coef_ptr, bias_ptr, y_ptr, M, N, K, T, S, LP, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr, CH: tl.constexpr, JOIN: tl.constexpr,
):
    """y [M, N] = x [M, K] @ W^T (+ bias), or silu(gate) * up [M, N/2] for GLU; CH chunks per step.

    tiles int32 [T, S, BITS, 32, 4], coef fp32 [T, LP, 8, 4] (layout module), x/y 16-bit.
    JOIN: one MMA over both rows of each pair (columns (tile, g, r)) instead of one per r.
    """
    KC: tl.constexpr = 256 // BITS  # columns per chunk
    BK: tl.constexpr = CH * KC  # columns per step
    CPR: tl.constexpr = 16 // BITS  # codes per word per row
    EPS: tl.constexpr = 4 // (KC // 32)  # words e per 32-column span
    MASK: tl.constexpr = (1 << BITS) - 1
    NR: tl.constexpr = BLOCK_T * 8  # row pairs per program

    # programs ordered so GROUP_M blocks of x rows share one block of weights while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_t = tl.cdiv(T, BLOCK_T)
    per_group = GROUP_M * num_t
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_t = (pid % per_group) // size_m

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_ok = rows_m < M
    ri = tl.arange(0, NR)  # (tile, g)
    tt = pid_t * BLOCK_T + ri // 8
    g = ri % 8
    t_ok = tt < T
    # a row pair's 16 words of each chunk, in the order (a, t, b) that decodes to consecutive columns:
    # word 4 t + e (e = EPS a + b) of a chunk holds its columns 32 a + 8 t + CPR b + q, q < CPR
    iw = tl.arange(0, CH * 16)
    i16 = iw % 16
    word = (iw // 16) * 128 + 4 * ((i16 // EPS) % 4) + EPS * (i16 // (4 * EPS)) + i16 % EPS
    wptr = tiles_ptr + (tt * (S * BITS) * 128 + g * 16)[None, :] + word[:, None]  # [CH 16, NR]
    kk = tl.arange(0, BK)
    xptr = x_ptr + rows_m[:, None] * stride_xm + kk[None, :]  # [BLOCK_M, BK]
    qq = tl.arange(0, CPR)
    sh0 = BITS * (2 * (qq // 2)) + 16 * (qq % 2)  # r = 0
    sh1 = sh0 + BITS  # r = 1
    ch = tl.arange(0, CH)
    cptr = coef_ptr + (tt * (LP * 32) + g * 4)[None, :]  # [1, NR]

    if JOIN:
        acc = tl.zeros((BLOCK_M, 2 * NR), dtype=tl.float32)
    else:
        acc0 = tl.zeros((BLOCK_M, NR), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, NR), dtype=tl.float32)
    for c in range(0, S * BITS // CH):
        k0 = c * BK
        xt = tl.load(xptr + k0, mask=m_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)  # [BLOCK_M, BK]
        words = tl.load(wptr + c * (CH * 128), mask=t_ok[None, :], other=0)  # [CH 16, NR]
        coef = cptr + ((k0 + ch * KC) // GROUP * 32)[:, None]  # [CH, NR]: the chunks' groups
        s0 = tl.load(coef, mask=t_ok[None, :], other=0.0)
        z0 = tl.load(coef + 1, mask=t_ok[None, :], other=0.0)
        s1 = tl.load(coef + 2, mask=t_ok[None, :], other=0.0)
        z1 = tl.load(coef + 3, mask=t_ok[None, :], other=0.0)
        q0 = tl.reshape((words[:, None, :] >> sh0[None, :, None]) & MASK, (CH, KC, NR)).to(tl.float32)
        q1 = tl.reshape((words[:, None, :] >> sh1[None, :, None]) & MASK, (CH, KC, NR)).to(tl.float32)
        w0 = tl.reshape(q0 * s0[:, None, :] + z0[:, None, :], (BK, NR)).to(xt.dtype)
        w1 = tl.reshape(q1 * s1[:, None, :] + z1[:, None, :], (BK, NR)).to(xt.dtype)
        if JOIN:
            acc = tl.dot(xt, tl.reshape(tl.join(w0, w1), (BK, 2 * NR)), acc)
        else:
            acc0 = tl.dot(xt, w0, acc0)
            acc1 = tl.dot(xt, w1, acc1)
    if JOIN:
        acc0, acc1 = tl.split(tl.reshape(acc, (BLOCK_M, NR, 2)))

    if HAS_BIAS:
        acc0 += tl.load(bias_ptr + tt * 16 + g, mask=t_ok, other=0.0)[None, :]
        acc1 += tl.load(bias_ptr + tt * 16 + 8 + g, mask=t_ok, other=0.0)[None, :]
    ymask = m_ok[:, None] & t_ok[None, :]
    ybase = y_ptr + rows_m[:, None] * stride_ym
    if GLU:
        act = acc0 / (1.0 + tl.exp(-acc0)) * acc1
        tl.store(ybase + (tt * 8 + g)[None, :], act.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        n0 = tt * 16 + g
        tl.store(ybase + n0[None, :], acc0.to(y_ptr.dtype.element_ty), mask=ymask & (n0 < N)[None, :])
        tl.store(ybase + (n0 + 8)[None, :], acc1.to(y_ptr.dtype.element_ty), mask=ymask & (n0 + 8 < N)[None, :])


def lowbit_gemm(x: torch.Tensor, tiles: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None, bits: int,
                group_size: int, n: int, glu: bool, cfg: GemmConfig = DEFAULT_CONFIG,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (unit column stride) @ the tile-layout weight -> [M, N] (or [M, N/2] for ``glu``),
    x's dtype. ``bias`` fp32 [N] in kernel row order or None."""
    if not gemm_fits(bits, group_size):
        raise ValueError(f"lowbit_gemm takes {GEMM_BITS}-bit weights with group >= {256 // max(bits, 1)} "
                         f"columns, not bits={bits}, group_size={group_size}")
    if bits % cfg.chunks:
        raise ValueError(f"chunks={cfg.chunks} must divide the {bits} chunks of a 256-column step")
    m, k = x.shape
    t_, s_ = tiles.shape[0], tiles.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    shape = (m, n // 2) if glu else (m, n)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(t_, cfg.block_t),)
    _lowbit_gemm_kernel[grid](
        x, tiles, coef, bias if bias is not None else coef, out, m, n, k, t_, s_, coef.shape[1], x.stride(0),
        out.stride(0), BITS=bits, GROUP=group_size, HAS_BIAS=bias is not None, GLU=glu,
        BLOCK_M=cfg.block_m, BLOCK_T=cfg.block_t, GROUP_M=cfg.group_m, CH=cfg.chunks, JOIN=cfg.join,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


__all__ = ["DEFAULT_CONFIG", "GEMM_BITS", "GemmConfig", "chunk_cols", "gemm_config", "gemm_fits", "lowbit_gemm"]
