"""Round-to-nearest (RTN) group-wise quantization: the baseline and the fast path for unit tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qalora.lowbit import check_bits
from qalora.model_io import set_submodule
from qalora.quantizers.surgery import check_targets, lowbit_from_linear


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize ``weight`` [D_out, D_in] per (row, group).

    Returns codes uint8 [D_out, D_in], scales fp16 [D_out, L], zeros fp32 [D_out, L] (integer
    valued, as GPTQ engines produce). Codes are computed against the fp16-rounded scale so the
    stored triple dequantizes to exactly what was rounded.
    """
    check_bits(bits)
    d_out, d_in = weight.shape
    maxq = (1 << bits) - 1
    w = weight.detach().to(torch.float32).reshape(d_out, d_in // group_size, group_size)
    wmin = w.amin(-1).clamp(max=0)
    wmax = w.amax(-1).clamp(min=0)
    if sym:
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float16).to(torch.float32)
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return codes.reshape(d_out, d_in).to(torch.uint8), scale.to(torch.float16), zero


def quantize_model_rtn(
    model: nn.Module,
    bits: int,
    group_size: int,
    targets: Sequence[str],
    sym: bool = False,
    progress: bool = True,
) -> list[str]:
    """Replace every target nn.Linear of ``model`` in place; returns the quantized layer names."""
    check_bits(bits)
    layers = check_targets(model, targets, group_size)
    for name, linear in tqdm(layers.items(), desc=f"RTN int{bits}.g{group_size}", disable=not progress):
        codes, scales, zeros = rtn_quantize(linear.weight, bits, group_size, sym)
        set_submodule(model, name, lowbit_from_linear(linear, codes, scales, zeros, bits, group_size, name))
    return list(layers)
