"""GPU matmul entry points. The low-bit kernels are CUDA C++ (``lowbit_cuda.cu``: skinny GEMV and dequant;
``lowbit_gemm.cu``: the wgmma GEMM, Hopper, for prefill and 17-32-row decode batches; built on first use);
the dense fp16/bf16 GEMV twin used by the benchmark's baseline is Triton. Importing this module
needs neither a GPU nor triton.

Shapes: x [M, K] (unit column stride), weights as :class:`~qalora.kernels.prepared.PreparedWeight`,
outputs [M, N] ([M, N/2] for ``glu`` weights).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qalora.kernels.cuda_ext import ext
from qalora.kernels.prepared import PreparedWeight

SKINNY_MAX_M = 32  # rows above this run the large-M path (``large_m_path``)
SX_MAX_ROWS, SX_MAX_BYTES = 4, 24 * 1024  # lowbit_cuda.cu's limits for staging x in shared memory
EPI_STORE, EPI_ACCUM, EPI_GLU = 0, 1, 2
NEXT_NORM_MAX_ROWS = 8  # lowbit_cuda.cu writes a NextNorm from its one-fragment kernels only
NORM_SUMSQ_BITS = 4  # ... and reads one (norm_sumsq) in its 4-bit kernels only
MANY_TILES = 768  # 16-row tiles from which blocks of 4 warps beat 8
MAX_WARPS = 8  # warps per block, each taking a slice of K (bounded by the kernel's shared memory)
DEFAULT_STAGES = 2  # cp.async ring slots per warp: stages - 1 steps in flight while one is computed
DEEP_STAGES = 4  # ... where each warp takes more than DEEP_STEPS of the weight's 256-column steps
DEEP_STEPS = 4

_EMPTY: dict[torch.device, torch.Tensor] = {}


def _empty(device: torch.device) -> torch.Tensor:
    """An fp32 [0] tensor standing for "no norm weight / no bias" (one per device, graph-safe)."""
    t = _EMPTY.get(device)
    if t is None:
        t = _EMPTY[device] = torch.empty(0, dtype=torch.float32, device=device)
    return t


def default_warps(pw: PreparedWeight) -> int:
    """Warps per block, each taking a slice of K: 4 for weights of many tiles (LLaMA-7B
    qkv: 768, gate_up: 1376), whose blocks (two tiles each) then fit the SMs at once, else 8; never
    more than one per 256-column step. Measured on an H200 (``benchmarks/kernel_ab.py``, RESULTS
    round 3): qkv M=16 22.9 us with 4 against 29.5 with 8, gate_up M=32 68.2 against 83.0; o and
    down (256 tiles) M=32 16.7 and 36.8 with 8 against 20.8 and 48.0 with 4."""
    tiles, steps = pw.tiles.shape[0], pw.tiles.shape[1]
    return max(1, min(4 if tiles >= MANY_TILES else MAX_WARPS, steps))


def default_stages(pw: PreparedWeight, warps: int, m: int) -> int:
    """Ring slots per warp for ``m`` rows: DEEP_STAGES for a 4-bit weight where the kernel stages x
    (``stages_x``) and each of ``warps`` takes more than DEEP_STEPS of its 256-column steps (LLaMA-7B down,
    K = 11008: 43 steps over 8 warps), else DEFAULT_STAGES. Measured on an H200 (benchmarks/RESULTS.md
    round 14): down at M = 1 with 8 warps 12.0 us against 13.0, INT4 decode at batch 1 533 against 515
    tok/s. At 4 steps a warp (qkv, gate_up with 4 warps) the deeper ring's shared memory costs blocks per SM
    instead (qkv M = 1: 15.0 us against 11.1). At batch 8 and 16 the decode lost 1-2% with it (3296 against
    3327, 4164 against 4237 tok/s), and INT2 at batch 1 0.6%, though down alone ran faster in both."""
    deep = pw.bits == 4 and stages_x(m, pw.in_features) and pw.tiles.shape[1] > DEEP_STEPS * warps
    return DEEP_STAGES if deep else DEFAULT_STAGES


def stages_x(m: int, k: int) -> bool:
    """Whether the kernel stages ``m`` rows of 16-bit x [m, k] in shared memory (lowbit_cuda.cu's
    rule). Only then does the fused RMSNorm prologue pay: without staging every warp re-reads and
    re-normalizes fp32 x for every span, and a separate RMSNorm pass is cheaper (H200, LLaMA-7B
    qkv/gate_up at M = 32: 203.6 us per fused call against ~71 unfused; benchmarks/RESULTS.md)."""
    return m <= SX_MAX_ROWS and k % 8 == 0 and m * (-(-k // 256) * 256 + 32) * 2 <= SX_MAX_BYTES


@dataclass
class NextNorm:
    """The next RMSNorm's input, written by a residual-add GEMV (``gemv(..., accumulate=True, next_norm=)``) for
    the GEMV after it (``gemv(nn.xn, ..., norm_sumsq=nn.sumsq)``): the decoder at batch <= 2, o -> gate_up and
    down -> the next layer's qkv. That GEMV's blocks then stage 16-bit x * weight and a few partial sums
    instead of the fp32 stream and the fp32 weight, 4x fewer bytes (benchmarks/RESULTS.md round 14).

    - ``weight``: fp32 [D], the norm's weight.
    - ``xn``: [M, D] in the compute dtype, the residual stream (after the add) times ``weight``.
    - ``sumsq``: fp32 [M, ceil(D / 16)], per 16 rows of the stream's D the sum of their squares."""

    weight: torch.Tensor
    xn: torch.Tensor
    sumsq: torch.Tensor


def _check_next_norm(nn: NextNorm, m: int, n: int, dtype: torch.dtype) -> None:
    want = {"weight": (torch.float32, (n,)), "xn": (dtype, (m, n)), "sumsq": (torch.float32, (m, -(-n // 16)))}
    for name, (dt, shape) in want.items():
        t = getattr(nn, name)
        if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"next_norm.{name} must be a contiguous {dt} tensor {list(shape)}, "
                             f"got {t.dtype} {list(t.shape)}")


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride, a row stride of a multiple of 16 bytes and a 16-byte aligned
    base (the kernel reads 8 activations per 16-byte load)."""
    per16 = 16 // x.element_size()
    if x.stride(-1) != 1 or x.stride(0) % per16 or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    return x


def _output(out: torch.Tensor | None, pw: PreparedWeight, m: int, dtype: torch.dtype, device: torch.device,
            accumulate: bool) -> torch.Tensor:
    """The low-bit matmul's output for m rows: ``out`` checked, or a new one. ``accumulate``: fp32 [M, N]
    receiving out += (given, no glu); else ``dtype`` [M, N] ([M, N/2] for glu weights)."""
    n = pw.out_features
    if accumulate:
        if pw.glu or out is None or out.dtype != torch.float32 or tuple(out.shape) != (m, n) or out.stride(1) != 1:
            raise ValueError("accumulate=True needs an fp32 out tensor [M, N] (and no glu)")
        return out
    shape = (m, n // 2) if pw.glu else (m, n)
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {dtype} {shape} with unit column stride")
    return out


def gemv(
    x: torch.Tensor,
    pw: PreparedWeight,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
    warps: int | None = None,
    stages: int | None = None,
    pdl: bool = True,
    norm_sumsq: torch.Tensor | None = None,
    next_norm: NextNorm | None = None,
) -> torch.Tensor:
    """Skinny low-bit matmul for M <= 32 rows: returns ``out`` = x @ W^T (+ bias). On Hopper, batches of
    ``WGMMA_MIN_M`` rows or more against weights of many tiles run the wgmma GEMM (``decode_gemm_plan``;
    not when ``warps`` is given), the skinny GEMV otherwise.

    - ``norm_weight`` (fp32 [K]): x is an fp32 residual stream [M, K] and the input is
      rmsnorm(x, eps) * norm_weight, fused into the kernel where it stages x (``stages_x``), else
      computed first; ``dtype`` picks the compute dtype.
    - ``norm_sumsq`` (fp32 [M, P]): x is rmsnorm's numerator already, stream * weight (a
      :class:`NextNorm`'s ``xn``), and these are partial sums of squares of the stream's rows (its
      ``sumsq``); the kernel scales by 1/rms from them. Only where x is staged (``stages_x``), 4-bit
      weights only.
    - ``accumulate``: ``out`` is fp32 [M, N] and receives out += x @ W^T (a residual add); with
      ``next_norm`` (up to 8 rows) the kernel also writes that norm's input from the new stream
      (:class:`NextNorm`).
    - a ``glu`` weight returns silu(gate) * up, [M, N/2].
    - ``dtype``: compute/output dtype (fp16/bf16); defaults to x's dtype.
    - ``warps`` per block (1..8, each a slice of K) and ``stages`` (1..4) of each warp's
      shared-memory load pipeline: tuning knobs, the defaults (``default_warps``, ``default_stages``)
      are the measured best on an H200.
    - ``pdl``: a programmatic dependent launch: the kernel's blocks may start, and ask for their first
      weights, while the kernel before it on the stream finishes; they wait for it before they touch
      x or ``out``, so the result is the same bits either way. Whether it pays depends on the kernels
      around it: the decoder picks it per role and bit width (``decoder.gemv_pdl``, measured in
      benchmarks/RESULTS.md round 10).
    """
    m, k = x.shape
    n = pw.out_features
    if k != pw.in_features:
        raise ValueError(f"x {tuple(x.shape)} does not match D_in={pw.in_features}")
    if not 1 <= m <= SKINNY_MAX_M:
        raise ValueError(f"gemv takes 1..{SKINNY_MAX_M} rows, got {m}")
    if pw.tiles is None:
        raise ValueError(f"no kernel layout for bits={pw.bits}, group_size={pw.group_size}")
    dtype = dtype or x.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"compute dtype must be fp16 or bf16, not {dtype}")
    if norm_sumsq is not None:
        if norm_weight is not None or not stages_x(m, k):
            raise ValueError(f"norm_sumsq needs x staged ({m} rows of K={k} do not stage, see stages_x) "
                             "and no norm_weight")
        if pw.bits != NORM_SUMSQ_BITS:
            raise ValueError(f"norm_sumsq takes {NORM_SUMSQ_BITS}-bit weights (the kernel compiles it there only), "
                             f"not {pw.bits}-bit")
        if norm_sumsq.dtype != torch.float32 or norm_sumsq.dim() != 2 or norm_sumsq.shape[0] != m:
            raise ValueError(f"norm_sumsq must be fp32 [M={m}, P], got {norm_sumsq.dtype} {list(norm_sumsq.shape)}")
    if next_norm is not None:
        if not accumulate:
            raise ValueError("next_norm is written by the residual add: it needs accumulate=True")
        if m > NEXT_NORM_MAX_ROWS:
            raise ValueError(f"next_norm is written for up to {NEXT_NORM_MAX_ROWS} rows, not {m}")
        _check_next_norm(next_norm, m, n, dtype)
    if norm_weight is not None and not stages_x(m, k):
        # the kernel fuses the norm only into staged x; above that, normalize first (fp32, then dtype)
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(dtype)
        norm_weight = None
    if norm_weight is not None:
        x = _aligned(x.float())
        nw = norm_weight.float().contiguous()
    else:
        x, nw = _aligned(x.to(dtype)), _empty(x.device)
    out = _output(out, pw, m, dtype, x.device, accumulate)
    epi = EPI_ACCUM if accumulate else EPI_GLU if pw.glu else EPI_STORE
    fused = norm_weight is not None or norm_sumsq is not None or next_norm is not None  # the GEMV's alone
    plan = decode_gemm_plan(m, pw) if not fused and warps is None and wgmma_available(x.device) else None
    if plan is not None:
        return wgmma_gemm(x, pw, plan[0], out=out, accumulate=accumulate, splits=plan[1])
    none = _empty(x.device)
    bias = pw.bias if pw.bias is not None else none
    warps = warps or default_warps(pw)
    ss_in = none if norm_sumsq is None else norm_sumsq.contiguous()
    nw_next, xn, ss_out = (none,) * 3 if next_norm is None else (next_norm.weight, next_norm.xn, next_norm.sumsq)
    ext().gemv(x, nw, pw.tiles, pw.coef, bias, out, ss_in, nw_next, xn, ss_out, pw.bits, n, k, pw.log2_spg, epi, eps,
               warps, stages or default_stages(pw, warps, m), dtype == torch.bfloat16, pdl)
    return out


# gemv runs the wgmma GEMM on Hopper from WGMMA_MIN_M rows for weights of WGMMA_MIN_TILES 16-row tiles or
# more (decode_gemm_plan). H200, LLaMA-7B, 4 bit g128, each GEMM as the decode step calls it (RESULTS round
# 9, us, skinny GEMV -> wgmma GEMM): M = 32 qkv 40.8 -> 30.7, gate_up 62.6 -> 39.1; o 17.1 and down 35.5
# against 22.9 and 35.1 (4 K splits); at M = 16 the GEMV is ahead on every shape (qkv 17.8 against 26.0,
# gate_up 33.0 against 36.4): the wgmma GEMM takes nearly the same time at M = 8 as at 32, bound by its
# dequantization's instructions at ~6 warps per SM (the same time with its wgmmas removed).
WGMMA_MIN_M = 17
WGMMA_MIN_TILES = MANY_TILES


def decode_gemm_plan(m: int, pw: PreparedWeight) -> tuple[int, int] | None:
    """(block shape, splits of K) of the wgmma GEMM for ``m`` decode rows against ``pw``, or None where the
    skinny GEMV is faster (``WGMMA_MIN_M``, ``WGMMA_MIN_TILES``): :func:`gemm_config`'s shape, K split in
    two until its blocks cover every SM (weights of few tiles)."""
    tiles, steps = pw.tiles.shape[:2]
    if m < WGMMA_MIN_M or tiles < WGMMA_MIN_TILES:
        return None
    cfg = gemm_config(m, pw.out_features)
    blocks, splits = _gemm_blocks(m, tiles, cfg), 1
    while blocks * splits < _sm_count(pw.tiles.device) and 2 * splits <= steps // 2:
        splits *= 2
    return cfg, splits


def dequant(pw: PreparedWeight, dtype: torch.dtype, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full weight [N, K] in ``dtype`` (fp16/bf16/fp32), kernel row order, one kernel."""
    if pw.tiles is None:
        raise ValueError(f"no kernel layout for bits={pw.bits}, group_size={pw.group_size}")
    if out is None:
        out = torch.empty(pw.out_features, pw.in_features, device=pw.tiles.device, dtype=dtype)
    ext().dequant(pw.tiles, pw.coef, out, pw.bits, pw.log2_spg)
    return out


def glu_act(y: torch.Tensor) -> torch.Tensor:
    """[M, 2F] in glu row order (blocks of 8 gate then 8 up) -> silu(gate) * up [M, F]."""
    m, n2 = y.shape
    y = y.view(m, n2 // 16, 2, 8)
    return (F.silu(y[:, :, 0].float()) * y[:, :, 1].float()).to(y.dtype).reshape(m, n2 // 2)


def dequant_matmul(x: torch.Tensor, pw: PreparedWeight) -> torch.Tensor:
    """Dequantize to x's dtype, then cuBLAS (the large-M path)."""
    w = dequant(pw, x.dtype)
    y = F.linear(x, w, None if pw.bias is None else pw.bias.to(x.dtype))
    return glu_act(y) if pw.glu else y


# lowbit_gemm.cu's block shapes by index: (x rows BN, warpgroups WG (64 weight rows each), slabs of 16
# columns per k-block KBS, x ring slots NS, code ring slots CS (256-column steps), copy warps WS: 0 thread 0
# copies between barriers, 1 a copy warp, 2 a copy warpgroup (warp specialization; the fastest per shape,
# QLB_GEMM_CONFIGS))
GEMM_CONFIGS = {0: (256, 2, 4, 4, 2, 0), 1: (128, 2, 8, 4, 2, 1), 2: (256, 2, 4, 3, 2, 0), 3: (64, 2, 8, 4, 2, 1),
                4: (32, 1, 8, 4, 4, 2), 5: (64, 1, 8, 4, 4, 1)}
SPLIT_MAX_ROWS = 64  # split K is compiled in for blocks of up to this many x rows (QLB_GEMM_SPLIT_ROWS)


def gemm_config(m: int, n: int) -> int:
    """The block shape for x [m, K] against a weight of n rows: the fastest on an H200 on LLaMA-7B shapes
    (benchmarks/gemm_ab.py, RESULTS rounds 8-9): one warpgroup against 32 x rows up to M = 32 and 64 up to
    M = 64, with a 4-step code ring (M = 64: qkv / o / gate_up / down 34.7 / 33.2 / 64.3 / 70.9 us against
    39.8 / 46.0 / 77.4 / 105.4 with two warpgroups); above, 256 x rows, except for weights of up to 4096
    rows below M = 1024, whose 128-row blocks would then fill the GPU in too few waves: 128 x rows (8-slab
    k-blocks) there, 64 up to M = 256 (o, down at M = 512: 44.6 / 110.3 us against 56.2 / 139.2 with 256; at
    M = 256 37.8 / 92.9 with 64 against 43.3 / 110.3 with 128)."""
    if m <= 64:
        return 4 if m <= 32 else 5
    if n <= 4096 and m < 1024:
        return 3 if m <= 256 else 1
    return 0


def x_slab_order(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x [M, K] (K % 32 == 0) -> [M, 256 steps], zero padded, each 32 columns reordered so that the wgmma
    GEMM's k slots are contiguous (lowbit_gemm.cu): columns 8 t + 4 f + 2 h + j move to 16 f + 8 h + 2 t + j.
    The first half of :func:`x_image_reference` (the GPU path does both in one pass, :func:`x_image`)."""
    m, k = x.shape
    xs = x.new_empty(m, steps * 256) if k == steps * 256 else x.new_zeros(m, steps * 256)
    # moved as 4-byte words (column pairs j): word 4 t + 2 f + h of each 16 goes to 8 f + 4 h + t
    w = x.contiguous().view(torch.int32).view(m, k // 32, 4, 2, 2)
    xs.view(torch.int32)[:, : k // 2].view(m, k // 32, 2, 2, 4).copy_(w.permute(0, 1, 3, 4, 2))
    return xs


def x_image_reference(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x [M, K] -> [4 steps, Mp, 64] (Mp: M rounded up to 8), zero padded: x as the bulk wgmma GEMM copies
    it into shared memory, in torch (lowbit_gemm.cu's x_image_kernel is the GPU's): atom a, row r holds
    columns 64 a .. 64 a + 63 of ``x_slab_order(x)``, its 16-byte chunk c at chunk c ^ (r % 8) (the
    128-byte swizzle): an atom's rows are contiguous, so the GEMM copies a block's k-block as one run
    per atom."""
    m = x.shape[0]
    mp = -(-m // 8) * 8
    xs = F.pad(x_slab_order(x, steps), (0, 0, 0, mp - m)).view(mp // 8, 8, 4 * steps, 8, 8)
    r = torch.arange(8, device=x.device)
    swz = r[:, None] ^ r[None, :]  # [r, c'] -> the chunk c stored at c'
    return xs[:, r[:, None], :, swz].permute(3, 2, 0, 1, 4).reshape(4 * steps, mp, 64)


def x_image(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x [M, K] fp16/bf16 on a Hopper GPU -> its image [4 steps, Mp, 64] (see :func:`x_image_reference`),
    one pass of 16-byte loads and stores."""
    m, k = x.shape
    if k % 8:
        x = F.pad(x, (0, 8 - k % 8))
    out = x.new_empty(4 * steps, -(-m // 8) * 8, 64)
    ext().x_image(_aligned(x), out)
    return out


def _gemm_blocks(m: int, tiles: int, cfg: int) -> int:
    """Blocks of one K range of the wgmma GEMM (lowbit_gemm.cu's grid x and y) at block shape ``cfg``."""
    bn, wg = GEMM_CONFIGS[cfg][:2]
    return -(-m // bn) * -(-tiles // (4 * wg))


_SPLIT_WS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split K's scratch on ``device``: fp32 partial sums and int32 arrival counters (zero between
    launches: the last block of each tile resets its own). One per device, grown on demand, shared by
    every split GEMM: they must run one at a time (one stream), as the decoder's do."""
    ws = _SPLIT_WS.get(device)
    if ws is None or ws[0].numel() < floats or ws[1].numel() < counters:
        old = (0, 0) if ws is None else (ws[0].numel(), ws[1].numel())
        ws = _SPLIT_WS[device] = (torch.empty(max(floats, old[0]), device=device, dtype=torch.float32),
                                  torch.zeros(max(counters, old[1]), device=device, dtype=torch.int32))
    return ws


def wgmma_gemm(x: torch.Tensor, pw: PreparedWeight, cfg: int | None = None, *, out: torch.Tensor | None = None,
               accumulate: bool = False, splits: int = 1) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> [M, N] (or silu(gate) * up [M, N/2]) through the wgmma dequant-GEMM
    (Hopper only): one pass laying x out as the kernel copies it (:func:`x_image`), then the GEMM with
    block shape ``cfg`` (``GEMM_CONFIGS``; default :func:`gemm_config`).

    - ``accumulate``: ``out`` is fp32 [M, N] and receives out += x @ W^T (+ bias) (no glu);
    - ``splits``: K cut into that many ranges, each a block of its own (weights of few rows at few x
      rows, whose blocks alone would leave SMs idle); the last block of each output tile adds the
      ranges' partial sums in a fixed order, so the result is the same bits every run. Blocks of up to
      ``SPLIT_MAX_ROWS`` x rows."""
    if x.shape[1] != pw.in_features:
        raise ValueError(f"x {tuple(x.shape)} does not match D_in={pw.in_features}")
    if pw.tiles is None:
        raise ValueError(f"no kernel layout for bits={pw.bits}, group_size={pw.group_size}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16 or bf16, not {x.dtype}")
    m, n, steps = x.shape[0], pw.out_features, pw.tiles.shape[1]
    cfg = gemm_config(m, n) if cfg is None else cfg
    if cfg not in GEMM_CONFIGS:
        raise ValueError(f"no block shape {cfg}: valid are {sorted(GEMM_CONFIGS)}")
    bn = GEMM_CONFIGS[cfg][0]
    if not 1 <= splits <= steps or (splits > 1 and bn > SPLIT_MAX_ROWS):
        raise ValueError(f"splits={splits}: 1..{steps} (the weight's 256-column steps), and 1 for blocks of more "
                         f"than {SPLIT_MAX_ROWS} x rows (block shape {cfg} has {bn})")
    out = _output(out, pw, m, x.dtype, x.device, accumulate)
    xs = x_image(x, steps)
    bias = pw.bias if pw.bias is not None else _empty(x.device)
    part = sem = _empty(x.device)
    if splits > 1:
        part, sem = _split_workspace(x.device, splits * m * n, _gemm_blocks(m, pw.tiles.shape[0], cfg))
    ext().gemm(xs, pw.tiles, pw.coef, bias, out, pw.bits, m, n, pw.log2_spg, pw.glu, cfg, accumulate, splits, part,
               sem)
    return out


# The large-M path ``auto`` takes: the wgmma GEMM on GLU weights at any M (silu(gate) * up in its epilogue) and,
# on the GPUs where it was measured faster, on every weight up to some rows (wgmma_auto_max_m); dequantize +
# cuBLAS on the others. GLU (H200, LLaMA-7B shapes, RESULTS round 8): 0.62-0.72x the time of dequantize +
# cuBLAS + the activation at M = 256-2048. Every weight (H100, RESULTS round 20, since round 19's copy warp at
# 64-128 x rows; prefill ms, two runs in one process, dequantize + cuBLAS on qkv, o and down -> the wgmma GEMM
# there): 512 tokens 18.97 / 19.04 -> 18.42 / 18.46, 1024 tokens 32.11 / 32.33 -> 31.38 / 31.31, but 1536
# tokens 45.01 / 45.52 -> 48.96 / 48.77 and 2048 60.46 / 60.89 -> 62.31 / 62.28. Not on the H200 until measured
# there: it has 1.4x the H100's bandwidth for the same tensor cores, which speeds dequantize + cuBLAS (the
# weight written and read back) and not the GEMM, and round 11 (H200, before the copy warp) measured the GEMM
# on qkv / o / down 0.8-4.2% slower at 512 tokens.
LARGE_M_AUTO = "dequant"
GLU_AUTO = "wgmma"
WGMMA_AUTO_MAX_M_BY_GPU = {"H100": 1024}  # a substring of the GPU's name -> rows
WGMMA_AUTO_MAX_M: int | None = None  # set: these rows on every GPU (benchmarks' A/B knob)


@functools.lru_cache(maxsize=None)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def wgmma_auto_max_m(device: torch.device) -> int:
    """The rows up to which ``auto`` runs the wgmma GEMM on every weight on ``device``: ``WGMMA_AUTO_MAX_M``
    where set, else this GPU's measured figure (``WGMMA_AUTO_MAX_M_BY_GPU``), else 0 (GLU weights only)."""
    if WGMMA_AUTO_MAX_M is not None:
        return WGMMA_AUTO_MAX_M
    if device.type != "cuda":
        return 0
    return next((rows for key, rows in WGMMA_AUTO_MAX_M_BY_GPU.items() if key in _gpu_name(device)), 0)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def wgmma_available(device: torch.device) -> bool:
    """The wgmma GEMM runs on Hopper GPUs (sm_90a code). Cached: asked on every large-M matmul."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _path_fits(pw: PreparedWeight, path: str, dtype: torch.dtype | None) -> tuple[bool, str]:
    """Whether ``path`` can take ``pw`` (and activations of ``dtype``, if given) here, and what it needs."""
    if path == "dequant":
        return True, ""
    if path == "wgmma":
        ok_dtype = dtype in (None, torch.float16, torch.bfloat16)
        fits = ok_dtype and pw.tiles is not None and wgmma_available(pw.tiles.device)
        return fits, "a Hopper GPU (sm_90), a kernel layout and fp16/bf16 activations"
    try:
        from qalora.kernels.lowbit_gemm_triton import gemm_fits
    except ImportError:
        fits = False
    else:
        fits = gemm_fits(pw.bits, pw.group_size)
    return fits, "2/4-bit weights with groups of whole chunks (and triton)"


def large_m_path(pw: PreparedWeight, prefer: str = "auto", dtype: torch.dtype | None = None,
                 m: int | None = None) -> str:
    """The large-M path: ``dequant`` (dequantize with one kernel, then cuBLAS), ``wgmma`` (the CUDA
    dequant-GEMM, :func:`wgmma_gemm`: Hopper, any kernel layout) or ``fused`` (the Triton dequant-GEMM,
    :mod:`qalora.kernels.lowbit_gemm_triton`: 2/4-bit, groups of whole chunks, needs triton).
    ``auto``: ``GLU_AUTO`` for GLU weights and for ``m`` (x's rows, when given) up to
    :func:`wgmma_auto_max_m`, else ``LARGE_M_AUTO`` (the measured fastest), where the weight, the device and
    the activations' ``dtype`` (when given) allow it, else ``dequant``."""
    if prefer not in ("auto", "fused", "dequant", "wgmma"):
        raise ValueError(f"large-M path must be auto, wgmma, fused or dequant, not {prefer!r}")
    if prefer == "auto":
        few_rows = m is not None and pw.tiles is not None and m <= wgmma_auto_max_m(pw.tiles.device)
        wants = (GLU_AUTO, LARGE_M_AUTO) if pw.glu or few_rows else (LARGE_M_AUTO,)
        return next((w for w in wants if _path_fits(pw, w, dtype)[0]), "dequant")
    fits, why = _path_fits(pw, prefer, dtype)
    if fits:
        return prefer
    raise ValueError(f"the {prefer} GEMM takes {why}, not bits={pw.bits}, group_size={pw.group_size} on "
                     f"{None if pw.tiles is None else pw.tiles.device}")


def fused_matmul(x: torch.Tensor, pw: PreparedWeight) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> [M, N] (or silu(gate) * up [M, N/2]) through the fused dequant-GEMM."""
    from qalora.kernels.lowbit_gemm_triton import gemm_config, lowbit_gemm

    if x.shape[1] != pw.in_features:
        raise ValueError(f"x {tuple(x.shape)} does not match D_in={pw.in_features}")
    return lowbit_gemm(x, pw.tiles, pw.coef, pw.bias, pw.bits, pw.group_size, pw.out_features, pw.glu,
                       gemm_config(x.shape[0], pw.out_features, pw.in_features))


def matmul(x: torch.Tensor, pw: PreparedWeight, large_m: str = "auto") -> torch.Tensor:
    """x [..., K] -> [..., N] (or [..., N/2] for glu): the skinny kernel up to SKINNY_MAX_M rows, else
    the large-M path :func:`large_m_path` picks."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    path = "skinny" if x2.shape[0] <= SKINNY_MAX_M else large_m_path(pw, large_m, x2.dtype, x2.shape[0])
    if path == "skinny":
        y = gemv(x2, pw)
    elif path == "wgmma":
        y = wgmma_gemm(x2, pw)
    elif path == "fused":
        y = fused_matmul(x2, pw)
    else:
        y = dequant_matmul(x2, pw)
    return y.reshape(*lead, y.shape[-1])


# ----------------------------------------------------------------------------------------------
# dense fp16/bf16 twin (Triton): the benchmark's fused baseline


@dataclass(frozen=True)
class DenseGemvConfig:
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1


DENSE_TUNED: dict[tuple[int, int, int], DenseGemvConfig] = {}


def m_bucket(m: int) -> int:
    """1, 16, 32 or 64: the dense twin's M tile for ``m`` rows."""
    if m <= 1:
        return 1
    return max(16, 1 << (m - 1).bit_length())


def dense_gemv(
    x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None, accumulate: bool = False,
    act: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    dtype: torch.dtype | None = None, cfg: DenseGemvConfig | None = None,
) -> torch.Tensor:
    """fp16/bf16 ``w`` [N, K]: out = f(x) @ w^T with the same fusions as the low-bit decoder
    (``act``: x = [gate | up] and the input is silu(gate) * up; ``norm_weight``: RMSNorm prologue
    on an fp32 stream; ``accumulate``: fp32 out += through atomics)."""
    import triton

    from qalora.kernels import dense_gemv_triton as tk

    tl_dtypes = {torch.float16: triton.language.float16, torch.bfloat16: triton.language.bfloat16}
    m = x.shape[0]
    n, k = w.shape
    dtype = dtype or w.dtype
    if cfg is None:
        mb = m_bucket(m)
        cfg = DENSE_TUNED.get((mb, n, k))
        if cfg is None:
            cfg = DenseGemvConfig(block_m=mb, block_n=16 if mb == 1 else 64, block_k=512 if mb == 1 else 128)
            progs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
            split = 1
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            while accumulate and progs * split < 4 * sms and k // (split * 2) >= cfg.block_k:
                split *= 2
            cfg = replace(cfg, split_k=split)
    if accumulate:
        target, atomic = out, True
    elif cfg.split_k > 1:
        target, atomic = torch.zeros(m, n, device=x.device, dtype=torch.float32), True
    else:
        out = torch.empty(m, n, device=x.device, dtype=dtype) if out is None else out
        target, atomic = out, False
    grid = (-(-n // cfg.block_n), cfg.split_k, -(-m // cfg.block_m))
    tk._dense_gemv_kernel[grid](
        x, w, target, norm_weight if norm_weight is not None else w, m, n, x.stride(0), w.stride(0),
        target.stride(0), k, eps, K=k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, ACT=act, NORM=norm_weight is not None, ATOMIC=atomic, DOT=cfg.block_m > 1,
        DOT_DTYPE=tl_dtypes[w.dtype], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if target is not out:
        if out is None:
            return target.to(dtype)
        out.copy_(target)
    return out


def load_tuned(path: str | os.PathLike) -> None:
    """Merge a tuned_configs.json (the dense twin's measured configs) into DENSE_TUNED."""
    data = json.loads(Path(path).read_text())
    for mb, n, k, cfg in data.get("dense", []):
        DENSE_TUNED[(mb, n, k)] = DenseGemvConfig(**cfg)


def _load_default_tuned() -> None:
    # the packaged table (measured on an H100), then an override file, later entries winning
    for path in (Path(__file__).with_name("tuned_configs.json"), os.environ.get("QALORA_TUNED_CONFIGS")):
        if path and Path(path).is_file():
            load_tuned(path)


_load_default_tuned()
