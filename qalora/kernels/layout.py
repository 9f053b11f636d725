"""Kernel-side layouts of the canonical low-bit format (pure PyTorch: runs and is tested on CPU).

The GPU kernels read the weight as *planes*: codes are taken in blocks of 32 consecutive input
columns, and each block is ``bits`` int32 words; plane ``p`` holds word ``p`` of every block:

    planes  int32 [bits, D_out, D_in/32]

- 4 bit: word p of block b holds codes 32b+8p .. 32b+8p+7 at bits 4i (the canonical words, only
  regrouped: plane p = canonical int32 words p, p+4, p+8, ...).
- 2 bit: word p holds codes 32b+16p .. 32b+16p+15 at bits 2i (canonical words, regrouped).
- 3 bit: word p (p = 0, 1, 2) holds codes 32b+10p+i at bits 3i (i < 10); the two codes left over,
  32b+30 and 32b+31, are spread over the spare top bits: c30 = w0[30:32] | w1[30] << 2 and
  c31 = w1[31] | w2[30:32] << 1. No code straddles a word, so every code is one shift and one mask.

Scales and zeros become one fp32 pair per (row, group), transposed so a block of rows reads
contiguously:

    coef    fp32 [2, L, D_out]:  coef[0] = s * 2^bits,  coef[1] = -s * (2^bits + z)

The kernels decode a code q as the float v = 1 + q / 2^bits (exact, built from bits without an
int->float conversion) and use W = s * (q - z) = coef0 * v + coef1.

``xperm`` reorders activations to match a block's slots when a kernel wants it: slot-major
``x[..., 32b + c] -> xp[..., c, b]``.
"""

from __future__ import annotations

import torch

from qalora.lowbit import unpack_codes

BLOCK = 32  # codes per block
KERNEL_BITS = (2, 3, 4)


def check_kernel_shape(in_features: int, bits: int, group_size: int) -> None:
    """Raise ValueError if the plane kernels cannot take this layer."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"plane kernels take {KERNEL_BITS}-bit weights, not {bits}-bit")
    if group_size % BLOCK or in_features % group_size:
        raise ValueError(f"plane kernels need group_size % 32 == 0 dividing D_in (got g={group_size}, D_in={in_features})")


def codes_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [N, K] (K % 32 == 0) -> planes int32 [bits, N, K/32] (module doc)."""
    n, k = codes.shape
    if k % BLOCK:
        raise ValueError(f"D_in={k} is not a multiple of {BLOCK}")
    c = codes.to(torch.int64).reshape(n, k // BLOCK, BLOCK)
    if bits in (2, 4):
        per = BLOCK // bits  # codes per word: 16 or 8
        sh = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
        words = (c.reshape(n, k // BLOCK, bits, per) << sh).sum(-1)  # [N, B, bits]
    elif bits == 3:
        sh = torch.arange(10, dtype=torch.int64, device=codes.device) * 3
        w = [(c[:, :, 10 * p:10 * p + 10] << sh).sum(-1) for p in range(3)]
        c30, c31 = c[:, :, 30], c[:, :, 31]
        w[0] = w[0] | ((c30 & 3) << 30)
        w[1] = w[1] | ((c30 >> 2) << 30) | ((c31 & 1) << 31)
        w[2] = w[2] | ((c31 >> 1) << 30)
        words = torch.stack(w, -1)
    else:
        raise ValueError(f"no plane layout for {bits}-bit")
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).permute(2, 0, 1).contiguous()


def planes_to_codes(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`codes_to_planes`: int32 [bits, N, K/32] -> uint8 codes [N, K]."""
    w = planes.to(torch.int64) & 0xFFFFFFFF  # [bits, N, B]
    _, n, nb = w.shape
    if bits in (2, 4):
        per = BLOCK // bits
        sh = torch.arange(per, dtype=torch.int64, device=planes.device) * bits
        c = (w.unsqueeze(-1) >> sh) & ((1 << bits) - 1)  # [bits, N, B, per]
        c = c.permute(1, 2, 0, 3).reshape(n, nb * BLOCK)
    elif bits == 3:
        sh = torch.arange(10, dtype=torch.int64, device=planes.device) * 3
        c = ((w.unsqueeze(-1) >> sh) & 7).permute(1, 2, 0, 3).reshape(n, nb, 30)
        c30 = ((w[0] >> 30) & 3) | (((w[1] >> 30) & 1) << 2)
        c31 = ((w[1] >> 31) & 1) | (((w[2] >> 30) & 3) << 1)
        c = torch.cat([c, c30.unsqueeze(-1), c31.unsqueeze(-1)], -1).reshape(n, nb * BLOCK)
    else:
        raise ValueError(f"no plane layout for {bits}-bit")
    return c.to(torch.uint8)


def qweight_to_planes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Canonical packed uint8 [N, K*bits/8] -> planes int32 [bits, N, K/32].

    4/2 bit regroup the canonical little-endian int32 words without unpacking; 3 bit repacks.
    """
    n = qweight.shape[0]
    if bits in (2, 4) and qweight.is_contiguous():
        words = qweight.view(torch.int32).reshape(n, in_features // BLOCK, bits)  # word p of block b at [n, b, p]
        return words.permute(2, 0, 1).contiguous()
    return codes_to_planes(unpack_codes(qweight, bits), bits)


def make_coef(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """scales [N, L] (fp16), zeros [N, L] (fp32) -> coef fp32 [2, L, N] (module doc)."""
    s = scales.to(torch.float32)
    z = zeros.to(torch.float32)
    m = float(1 << bits)
    return torch.stack([s * m, -s * (m + z)]).transpose(1, 2).contiguous()


def xperm(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> slot-major [..., 32, K/32] flattened back to [..., K] (contiguous)."""
    *lead, k = x.shape
    return x.reshape(*lead, k // BLOCK, BLOCK).transpose(-1, -2).reshape(*lead, k).contiguous()


def xperm_index(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Index ``idx`` with ``xperm(x) == x[..., idx]`` (for permuting weight rows/outputs)."""
    return torch.arange(k, device=device).reshape(k // BLOCK, BLOCK).t().reshape(k)
