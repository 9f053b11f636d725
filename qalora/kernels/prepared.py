"""PreparedWeight: a canonical low-bit weight repacked once for the kernels (pure PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qalora.kernels.layout import check_kernel_shape, make_coef, pack_tiles
from qalora.lowbit import LowBitLinear, dequantize, pack_codes, unpack_codes


@dataclass
class PreparedWeight:
    """One low-bit weight in the kernels' layout (:mod:`qalora.kernels.layout`).

    - ``tiles`` int32 [T, S, bits, 32, 4], ``coef`` fp32 [T, Lp, 8, 4] (None when the kernels
      cannot take the layer: 8 bit, group not a power of two >= 32)
    - ``bias`` fp32 [N] or None (in kernel row order)
    - ``glu``: rows are [gate; up] interleaved by :func:`~qalora.kernels.layout.glu_row_perm`
      and the layer's output is silu(gate) * up [.., N/2]
    - ``cpu_int4``: (packed uint8 [N, K/2], scale_and_zero fp32 [L, N, 2]) for torch's int4pack
      CPU kernel, or None
    - ``qweight``/``scales``/``zeros``/``ref_bias``: the canonical buffers (natural row order),
      kept for the reference/dequant fallback; None when dropped to save memory
    - ``dense``: fp32 [N, K] dequantized weight, built on first fp32 CPU call (``dense_weight``)
    """

    tiles: torch.Tensor | None
    coef: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    glu: bool = False
    cpu_int4: tuple[torch.Tensor, torch.Tensor] | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    ref_bias: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        """fp32 [N, K] reference dequant (:func:`reference_dequant`), built on first use and kept (the
        CPU fp32 path)."""
        if self.dense is None:
            self.dense = reference_dequant(self)
        return self.dense

    @property
    def log2_spg(self) -> int:
        """log2 of 32-column spans per group."""
        return (self.group_size // 32).bit_length() - 1

    def nbytes(self) -> int:
        """Bytes the kernels read per full pass over the weight (codes + coefficients + bias)."""
        n = 0 if self.tiles is None else self.tiles.numel() * 4
        n += 0 if self.coef is None else self.coef.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * 4)

    def drop_canonical(self) -> None:
        """Free the canonical copies (the kernels never read them)."""
        self.qweight = self.scales = self.zeros = self.ref_bias = None


def prepare_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    glu: bool = False,
    device: torch.device | str | None = None,
    cpu_int4: bool = False,
) -> PreparedWeight:
    """Repack canonical buffers (``LowBitLinear`` layout) for the kernels.

    ``glu``: the weight is [gate; up] stacked along D_out, and the prepared layer computes
    silu(x gate^T) * (x up^T) (fused into the kernel's epilogue on the skinny path).
    ``cpu_int4`` also builds torch's int4pack CPU operands (4-bit only).
    """
    from qalora.kernels.layout import glu_row_perm

    device = torch.device(device) if device is not None else qweight.device
    n = qweight.shape[0]
    if glu and n % 2:
        raise ValueError(f"glu needs an even D_out, got {n}")
    tiles = coef = kbias = None
    try:
        check_kernel_shape(in_features, bits, group_size)
        q, s, z, b = qweight, scales, zeros, bias
        if glu:
            perm = glu_row_perm(n // 2, qweight.device)
            q, s, z, b = q[perm], s[perm], z[perm], None if b is None else b[perm]
        tiles = pack_tiles(unpack_codes(q.contiguous(), bits), bits).to(device)
        coef = make_coef(s, z, group_size, in_features).to(device)
        kbias = None if b is None or not glu else b.to(device, torch.float32)
    except ValueError:
        if glu:
            raise
        # no tile layout (8 bit, odd group): the dequant fallback serves it
    packed = None
    if cpu_int4 and bits == 4 and not glu:
        from qalora.kernels.cpu import int4pack_operands

        packed = int4pack_operands(qweight, scales, zeros, group_size, in_features)
    ref_bias = None if bias is None else bias.to(device, torch.float32)
    return PreparedWeight(
        tiles=tiles, coef=coef, bias=kbias if glu else ref_bias, bits=bits, group_size=group_size,
        in_features=in_features, out_features=n, glu=glu, cpu_int4=packed,
        qweight=qweight.to(device), scales=scales.to(device), zeros=zeros.to(device), ref_bias=ref_bias,
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
    """fp32 [N, K] from the canonical buffers, natural row order (the reference the kernels are
    checked against; for a ``glu`` weight, the stacked [gate; up])."""
    if pw.qweight is None:
        raise ValueError("the canonical buffers were dropped: no dense weight to build")
    return dequantize(unpack_codes(pw.qweight, pw.bits), pw.scales, pw.zeros, pw.group_size)


__all__ = ["PreparedWeight", "prepare_weight", "prepare_layer", "concat_layers", "reference_dequant", "pack_codes"]
