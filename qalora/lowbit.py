"""The canonical low-bit linear layer: packed integer codes, fp16 scales, fp32 float zeros.

A weight W [D_out, D_in] is stored group-wise along the input dimension with group size g and
L = D_in / g contiguous groups (group k covers input columns [k*g, (k+1)*g)):

    W_hat[j, i] = scales[j, k] * (codes[j, i] - zeros[j, k])      k = i // g

- ``qweight`` uint8 [D_out, D_in * bits / 8]: each row is a little-endian bit stream of D_in
  codes of ``bits`` bits (code i occupies bits [i*bits, (i+1)*bits) of the row). The same rule
  covers 2/3/4/8 bit; 3-bit rows pack 8 codes into every 3 bytes.
- ``scales`` fp16 [D_out, L]: GPTQ engines produce fp16 scales; storing them unchanged keeps the
  GPTQ -> canonical conversion exact.
- ``zeros`` fp32 [D_out, L]: float zeros, because the QA-LoRA merge moves them by
  ``(alpha/r) * (B @ A) / s``, which is no integer. fp32 rather than fp16: an fp16 zero near 15
  (4-bit) or 255 (8-bit) has a spacing of 2^-7 or 2^-3 code steps, i.e. a merge error up to 12% of
  a quantization step at 8 bit; fp32 keeps it below 1e-5 of a step, far under the check's 1e-3
  logit bound, for 0.25 extra bits per weight at g=128.

Dequantization is computed in fp32 and then cast to the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {', '.join(map(str, SUPPORTED_BITS))}")


def check_group(in_features: int, group_size: int, layer: str = "layer") -> None:
    if group_size <= 0 or in_features % group_size != 0:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide D_in={in_features} of {layer}; "
            f"valid group sizes for it include {divisors}"
        )
    if in_features % 8 != 0:
        raise ValueError(f"D_in={in_features} of {layer} must be a multiple of 8 to pack codes")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [R, C] (values in [0, 2^bits)) into uint8 [R, C*bits/8].

    Codes are taken 8 at a time: 8 codes of b bits form one 8b-bit little-endian word, which is
    exactly b bytes. C must be a multiple of 8.
    """
    check_bits(bits)
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} codes per row: need a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # [R, C/8], 8*bits <= 32 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [R, C/8, bits]
    return packed.reshape(rows, cols * bits // 8).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [R, C*bits/8] -> uint8 codes [R, C]."""
    check_bits(bits)
    if bits == 8:
        return packed
    rows, nbytes = packed.shape
    p = packed.to(torch.int64).reshape(rows, nbytes // bits, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1)  # [R, C/8]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C/8, 8]
    return codes.reshape(rows, nbytes * 8 // bits).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes [D_out, D_in] (int), scales/zeros [D_out, L] -> fp32 weight [D_out, D_in]."""
    d_out, d_in = codes.shape
    q = codes.to(torch.float32).reshape(d_out, d_in // group_size, group_size)
    w = scales.to(torch.float32).unsqueeze(-1) * (q - zeros.to(torch.float32).unsqueeze(-1))
    return w.reshape(d_out, d_in)


class LowBitLinear(nn.Module):
    """A frozen group-wise quantized linear layer in the canonical format (see module doc).

    Buffers: ``qweight`` uint8 [D_out, D_in*bits/8], ``scales`` fp16 [D_out, L],
    ``zeros`` fp32 [D_out, L], optional ``bias`` [D_out].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        name: str = "layer",
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_group(in_features, group_size, name)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        # Frozen base: the dequantized weight may be cached per dtype while tuning (see ``cache``).
        self._cached: torch.Tensor | None = None
        self.cache_dequantized = False

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """uint8 [D_out, D_in]."""
        return unpack_codes(self.qweight, self.bits)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [D_out, D_in]."""
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Fill from integer codes [D_out, D_in], scales [D_out, L], float zeros [D_out, L]."""
        expected = (self.out_features, self.in_features)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codes shape {tuple(codes.shape)} != {expected}")
        if int(codes.max()) >= (1 << self.bits) or int(codes.min()) < 0:
            raise ValueError(f"codes out of range for {self.bits}-bit")
        self.qweight.copy_(pack_codes(codes, self.bits))
        self.scales.copy_(scales.to(torch.float16))
        self.zeros.copy_(zeros.to(torch.float32))
        self._cached = None

    def invalidate_cache(self) -> None:
        self._cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized and self._cached is not None and self._cached.dtype == x.dtype:
            w = self._cached
        else:
            w = self.dequantized_weight().to(x.dtype)
            if self.cache_dequantized:
                self._cached = w
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )
