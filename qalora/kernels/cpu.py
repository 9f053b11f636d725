"""CPU paths: 4-bit through torch's int4pack CPU kernel, 2/3/8 bit through the reference dequant.

torch's CPU int4 kernel computes W = (q - 8) * s + zp with per-(group, row) ``(s, zp)`` stored in
the activation dtype. With the canonical W = s * (q - z) that is zp = s * (8 - z). In fp32 the
result matches the reference dequant to fp32 rounding, but torch 2.13's fp32 variant is a slow
scalar loop (20-86x a dense fp32 matmul), so the int4pack backend sends fp32 activations to a
once-dequantized fp32 weight instead and uses this kernel for bf16/fp16 activations, where zp is
rounded to the activation dtype: an error of up to 2^-8 * |s (8 - z)| per weight in bf16
(``int4_error_bound``), the same order as the bf16 rounding of the activations themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qalora.lowbit import dequantize_packed, unpack_codes


# Group sizes torch's int4pack CPU kernel takes.
INT4PACK_GROUPS = (32, 64, 128, 256)


def int4pack_available() -> bool:
    return hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def int4pack_fits(bits: int, group_size: int, in_features: int) -> bool:
    """Whether torch's int4pack CPU kernel takes this layer: it is there, 4 bit, even D_in, group in
    :data:`INT4PACK_GROUPS`."""
    return bits == 4 and int4pack_available() and in_features % 2 == 0 and group_size in INT4PACK_GROUPS


def int4pack_operands(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Canonical 4-bit buffers -> (packed uint8 [N, K/2], scale_and_zero fp32 [L, N, 2]), or None
    when the kernel does not take the layer (:func:`int4pack_fits`)."""
    if not int4pack_fits(4, group_size, in_features):
        return None
    codes = unpack_codes(qweight.cpu(), 4).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = scales.cpu().to(torch.float32)
    zp = s * (8.0 - zeros.cpu().to(torch.float32))
    return packed, torch.stack([s.t(), zp.t()], -1).contiguous()


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    exact: bool = True,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype through ``aten._weight_int4pack_mm_for_cpu``.

    ``exact=True`` computes in fp32 (scale/zero kept in fp32); ``exact=False`` keeps a bf16/fp16
    ``x`` in its dtype, rounding scale and zero to it (faster on CPUs with bf16 units).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    dt = torch.float32 if exact or x.dtype == torch.float32 else x.dtype
    y = torch._weight_int4pack_mm_for_cpu(x2.to(dt).contiguous(), packed, group_size, scale_and_zero.to(dt))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, -1)


def dequant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference path (any bits): dequantize in fp32, cast to x's dtype, F.linear."""
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, x.dtype, use_triton=False)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_error_bound(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest per-weight error (absolute) from storing zp = s*(8 - z) and s in ``dtype``:
    half an ulp of each, |q - 8| <= 8 times the scale's."""
    eps = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    s = scales.to(torch.float32).abs()
    zp = (s * (8.0 - zeros.to(torch.float32))).abs()
    return float((eps * zp + 8 * eps * s).max())
