"""PreparedWeight: a canonical low-bit weight repacked once for the kernels (pure PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qalora.kernels.layout import BLOCK, check_kernel_shape, make_coef, qweight_to_planes
from qalora.lowbit import LowBitLinear, pack_codes, unpack_codes


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass
class PreparedWeight:
    """One low-bit weight in the kernels' layout.

    - ``planes`` int32 [bits, N, stride_wn] (columns past D_in/32 are padding, never read)
    - ``coef`` fp32 [2, L, N]: W = coef0 * (1 + q/2^bits) + coef1
    - ``bias`` fp32 [N] or None
    - ``cpu_int4``: (packed uint8 [N, K/2], scale_and_zero fp32 [L, N, 2]) for torch's int4pack
      CPU kernel, or None
    """

    planes: torch.Tensor | None
    coef: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    cpu_int4: tuple[torch.Tensor, torch.Tensor] | None = None
    # the canonical buffers, kept for the reference/dequant fallback
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @property
    def nbt(self) -> int:
        """32-code blocks per row."""
        return self.in_features // BLOCK

    @property
    def stride_wn(self) -> int:
        return self.planes.shape[-1]

    def nbytes(self) -> int:
        """Bytes the kernels read per full pass over the weight (codes + coefficients + bias)."""
        n = self.out_features * self.in_features * self.bits // 8
        n += 0 if self.coef is None else self.coef.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * 4)


def prepare_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    row_perm: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    cpu_int4: bool = False,
) -> PreparedWeight:
    """Repack canonical buffers (``LowBitLinear`` layout) for the kernels.

    ``row_perm`` (long [N]) reorders output rows: output j of the prepared weight is row
    ``row_perm[j]`` of the canonical one (used to emit outputs in a consumer's slot order).
    ``cpu_int4`` also builds torch's int4pack CPU operands (4-bit only).
    """
    device = torch.device(device) if device is not None else qweight.device
    n = qweight.shape[0]
    if row_perm is not None:
        row_perm = row_perm.to(qweight.device)
        qweight, scales, zeros = qweight[row_perm], scales[row_perm], zeros[row_perm]
        bias = None if bias is None else bias[row_perm]
    planes = coef = None
    try:
        check_kernel_shape(in_features, bits, group_size)
        p = qweight_to_planes(qweight.contiguous(), bits, in_features)
        nbt = in_features // BLOCK
        planes = torch.zeros(bits, n, _pad16(nbt), dtype=torch.int32, device=p.device)
        planes[:, :, :nbt] = p
        planes = planes.to(device)
        coef = make_coef(scales, zeros, bits).to(device)
    except ValueError:
        pass  # no plane layout (8 bit, g % 32 != 0): the dequant fallback serves it
    packed = None
    if cpu_int4 and bits == 4:
        from qalora.kernels.cpu import int4pack_operands

        packed = int4pack_operands(qweight, scales, zeros, group_size, in_features)
    return PreparedWeight(
        planes=planes, coef=coef, bias=None if bias is None else bias.to(device, torch.float32),
        bits=bits, group_size=group_size, in_features=in_features, out_features=n, cpu_int4=packed,
        qweight=qweight.to(device), scales=scales.to(device), zeros=zeros.to(device),
    )


def prepare_layer(layer: LowBitLinear, device: torch.device | str | None = None, **kw) -> PreparedWeight:
    """:func:`prepare_weight` for a ``LowBitLinear``."""
    return prepare_weight(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size,
                          layer.in_features, layer.bias, device=device, **kw)


def concat_layers(layers: list[LowBitLinear]) -> LowBitLinear:
    """Stack layers with the same input, bits and group along D_out (e.g. q/k/v): exact."""
    first = layers[0]
    for lay in layers:
        if (lay.in_features, lay.bits, lay.group_size) != (first.in_features, first.bits, first.group_size):
            raise ValueError("concat_layers needs equal in_features, bits and group_size")
    n = sum(lay.out_features for lay in layers)
    has_bias = any(lay.bias is not None for lay in layers)
    out = LowBitLinear(first.in_features, n, first.bits, first.group_size, bias=has_bias,
                       device=first.qweight.device)
    out.qweight.copy_(torch.cat([lay.qweight for lay in layers]))
    out.scales.copy_(torch.cat([lay.scales for lay in layers]))
    out.zeros.copy_(torch.cat([lay.zeros for lay in layers]))
    if has_bias:
        out.bias.copy_(torch.cat([lay.bias if lay.bias is not None else
                                  torch.zeros(lay.out_features, device=lay.qweight.device) for lay in layers]))
    return out


def reference_dequant(pw: PreparedWeight) -> torch.Tensor:
    """fp32 [N, K] from the canonical buffers (the reference the kernels are checked against)."""
    from qalora.lowbit import dequantize

    return dequantize(unpack_codes(pw.qweight, pw.bits), pw.scales, pw.zeros, pw.group_size)


__all__ = ["PreparedWeight", "prepare_weight", "prepare_layer", "concat_layers", "reference_dequant", "pack_codes"]
