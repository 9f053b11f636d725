"""The GPU kernels' tile layout of the canonical low-bit format (pure PyTorch: runs and is tested on CPU).

The weight [N, K] is cut into 16-row tiles and 256-column steps; one step of one tile is what a
warp decodes from one coalesced load of ``bits`` x 16 bytes per lane (``lowbit_cuda.cu``):

    tiles  int32 [T, S, bits, 32, 4]    T = cdiv(N, 16), S = cdiv(K, 256) (padding codes are 0)

Lane L = 4g + t holds 64 *pairs* (two codes of one row in adjacent columns). Pair
p = 8 sp + 4 f + i is row 16 T + g + 8 (i & 1), columns 256 S + 32 sp + 8 t + 4 f + 2 (i >> 1) + h
(h = 0, 1): the m16n8k16 A fragment f of span sp, matched to activations x[32 sp + 8t .. +7],
one 16-byte load. Pairs are packed so one mask extracts both codes into the two 16-bit halves:

- 4 bit: word p // 4, codes at bits 4 (p % 4) and 16 + 4 (p % 4);
- 2 bit: word p // 8, codes at bits 2 (p % 8) and 16 + 2 (p % 8);
- 3 bit: pairs p < 60 in word p // 5 at bits 3 (p % 5) and 16 + 3 (p % 5); pair 60 + j spreads
  bit b of its codes over bit 15 / bit 31 of word 3 j + b (the 24 spare bits).

Coefficients, one float4 per (tile, group, g): rows g and g + 8 of the tile,

    coef   fp32 [T, Lp, 8, 4] = (s[g], -s z[g], s[g+8], -s z[g+8]),   Lp = cdiv(S * 256, group)

so W = s q + (-s z) exactly as the canonical s (q - z) up to fp32 rounding of s z.
"""

from __future__ import annotations

import torch

TILE_N = 16
STEP_K = 256
KERNEL_BITS = (2, 3, 4)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_kernel_shape(in_features: int, bits: int, group_size: int) -> None:
    """Raise ValueError if the tile kernels cannot take this layer."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"tile kernels take {KERNEL_BITS}-bit weights, not {bits}-bit")
    if group_size < 32 or group_size & (group_size - 1) or in_features % group_size:
        raise ValueError(f"tile kernels need a power-of-two group >= 32 dividing D_in (got g={group_size}, "
                         f"D_in={in_features})")


def _pairs(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> int64 [T, S, 32, 64, 2] in lane/pair order (zero padded)."""
    n, k = codes.shape
    t_, s_ = _cdiv(n, TILE_N), _cdiv(k, STEP_K)
    c = torch.zeros(t_ * TILE_N, s_ * STEP_K, dtype=torch.int64, device=codes.device)
    c[:n, :k] = codes
    # rows (T, r, g), columns (S, sp, t, f, ih, h); pair i = 2 ih + r
    c = c.reshape(t_, 2, 8, s_, 8, 4, 2, 2, 2)
    c = c.permute(0, 3, 2, 5, 4, 6, 7, 1, 8)  # [T, S, g, t, sp, f, ih, r, h]
    return c.reshape(t_, s_, 32, 64, 2)


def _unpairs(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`_pairs`: [T, S, 32, 64, 2] -> [N, K]."""
    t_, s_ = p.shape[:2]
    c = p.reshape(t_, s_, 8, 4, 8, 2, 2, 2, 2).permute(0, 7, 2, 1, 4, 3, 5, 6, 8)  # [T, r, g, S, sp, t, f, ih, h]
    return c.reshape(t_ * TILE_N, s_ * STEP_K)[:n, :k]


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [N, K] -> tiles int32 [T, S, bits, 32, 4] (module doc)."""
    p = _pairs(codes)  # [T, S, L, 64, 2]
    lo, hi = p[..., 0], p[..., 1]
    if bits in (2, 4):
        per = 32 // (2 * bits)  # pairs per word: 4 or 8
        sh = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
        lo, hi = lo.reshape(*lo.shape[:-1], -1, per), hi.reshape(*hi.shape[:-1], -1, per)
        words = ((lo << sh) | (hi << (sh + 16))).sum(-1)
    elif bits == 3:
        sh = torch.arange(5, dtype=torch.int64, device=codes.device) * 3
        l5, h5 = lo[..., :60].reshape(*lo.shape[:-1], 12, 5), hi[..., :60].reshape(*hi.shape[:-1], 12, 5)
        words = ((l5 << sh) | (h5 << (sh + 16))).sum(-1)  # [T, S, L, 12]
        for j in range(4):
            for b in range(3):
                words[..., 3 * j + b] |= (((lo[..., 60 + j] >> b) & 1) << 15) | (((hi[..., 60 + j] >> b) & 1) << 31)
    else:
        raise ValueError(f"no tile layout for {bits}-bit")
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    t_, s_ = words.shape[:2]
    return words.reshape(t_, s_, 32, bits, 4).permute(0, 1, 3, 2, 4).contiguous()


def unpack_tiles(tiles: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: -> uint8 codes [N, K]."""
    t_, s_ = tiles.shape[:2]
    w = tiles.permute(0, 1, 3, 2, 4).reshape(t_, s_, 32, 4 * bits).to(torch.int64) & 0xFFFFFFFF
    m = (1 << bits) - 1
    if bits in (2, 4):
        per = 32 // (2 * bits)
        sh = torch.arange(per, dtype=torch.int64, device=tiles.device) * bits
        lo = ((w[..., None] >> sh) & m).reshape(t_, s_, 32, 64)
        hi = ((w[..., None] >> (sh + 16)) & m).reshape(t_, s_, 32, 64)
    else:
        sh = torch.arange(5, dtype=torch.int64, device=tiles.device) * 3
        lo60 = ((w[..., None] >> sh) & m).reshape(t_, s_, 32, 60)
        hi60 = ((w[..., None] >> (sh + 16)) & m).reshape(t_, s_, 32, 60)
        lo4 = sum(((w[..., b::3][..., :4] >> 15) & 1) << b for b in range(3))
        hi4 = sum(((w[..., b::3][..., :4] >> 31) & 1) << b for b in range(3))
        lo, hi = torch.cat([lo60, lo4], -1), torch.cat([hi60, hi4], -1)
    return _unpairs(torch.stack([lo, hi], -1), n, k).to(torch.uint8)


def make_coef(scales: torch.Tensor, zeros: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """scales [N, L] (fp16), zeros [N, L] (fp32) -> coef fp32 [T, Lp, 8, 4] (module doc)."""
    n, groups = scales.shape
    t_ = _cdiv(n, TILE_N)
    lp = _cdiv(_cdiv(in_features, STEP_K) * STEP_K, group_size)
    s = scales.to(torch.float64)
    c = -(s * zeros.to(torch.float64))  # one rounding to fp32, of the exact product
    both = torch.zeros(t_ * TILE_N, lp, 2, dtype=torch.float64, device=scales.device)
    both[:n, :groups, 0], both[:n, :groups, 1] = s, c
    both = both.reshape(t_, 2, 8, lp, 2).permute(0, 3, 2, 1, 4)  # [T, Lp, g, r, (s, c)]
    return both.reshape(t_, lp, 8, 4).to(torch.float32).contiguous()


def glu_row_perm(intermediate: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row order of a stacked [gate; up] weight [2F, K] for the kernels' fused SiLU(gate) * up
    epilogue: blocks of 8 gate rows then the 8 matching up rows, so each 16-row tile holds both."""
    if intermediate % 8:
        raise ValueError(f"GLU fusion needs intermediate size % 8 == 0, got {intermediate}")
    r = torch.arange(intermediate, device=device).reshape(-1, 8)
    return torch.stack([r, r + intermediate], 1).reshape(-1)
