"""Model surgery shared by every quantizer: find and check the target linears, build the canonical layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qalora.lowbit import LowBitLinear, check_group
from qalora.model_io import find_linear_targets


def lowbit_from_linear(
    linear: nn.Linear,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    name: str,
) -> LowBitLinear:
    """The canonical layer replacing ``linear``: codes [D_out, D_in], scales and zeros [D_out, L]; the
    bias, if any, copied in fp32."""
    layer = LowBitLinear(
        linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None, name=name
    )
    layer.set_quantized(codes, scales, zeros)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach().to(torch.float32))
    return layer


def check_targets(model: nn.Module, targets: Sequence[str], group_size: int) -> dict[str, nn.Linear]:
    """The target linears, after checking the group size divides every D_in (naming the layer)."""
    layers = find_linear_targets(model, targets)
    for name, mod in layers.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear: already quantized?")
        check_group(mod.in_features, group_size, name)
    return layers
