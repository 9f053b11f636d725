"""Quantizers: replace the target ``nn.Linear`` layers of a full-precision model, in place, by canonical
:class:`~qalora.lowbit.LowBitLinear` layers.

One entry point for every method, ``quantize_(model, config, ...)`` (torchao's shape): the config
dataclass names the method and its settings, the keyword arguments carry what a method needs besides
the model (GPTQ: the tokenizer, calibration token ids and a work folder). Each method also has its own
function with plain arguments:

- :mod:`.rtn`: round-to-nearest min-max, :func:`quantize_model_rtn` (any group size dividing D_in);
- :mod:`.gptq`: GPTQ through GPTQModel in a child process, :func:`quantize_model_gptq`, and the
  exact reader of GPTQ checkpoints;
- :mod:`.surgery`: what both share (target lookup and checks, building the canonical layer).

The quantize *stage* (load a model, quantize, write the canonical folder) is :mod:`qalora.quantize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qalora.model_io import DEFAULT_TARGETS
from qalora.quantizers.gptq import DEFAULT_DAMP_PERCENT, quantize_model_gptq
from qalora.quantizers.rtn import quantize_model_rtn, rtn_quantize
from qalora.quantizers.surgery import check_targets, lowbit_from_linear


@dataclass(frozen=True)
class _GroupwiseConfig:
    """What every method takes: bits, group size along D_in, the target linears (by last name component),
    symmetric or not."""

    bits: int
    group_size: int
    targets: Sequence[str] = field(default_factory=lambda: tuple(DEFAULT_TARGETS))
    sym: bool = False


@dataclass(frozen=True)
class RTNConfig(_GroupwiseConfig):
    """Round-to-nearest, min-max per (row, group)."""

    method = "rtn"


@dataclass(frozen=True)
class GPTQConfig(_GroupwiseConfig):
    """GPTQ through GPTQModel (act-order off: contiguous groups; see :mod:`qalora.quantizers.gptq`)."""

    damp_percent: float = DEFAULT_DAMP_PERCENT
    act_group_aware: bool = True
    device: str = "cpu"  # where GPTQModel runs: "cpu" or "cuda[:N]" (resolved; qalora.device.resolve_device)
    method = "gptq"


QuantizeConfig = RTNConfig | GPTQConfig


def quantize_(
    model: nn.Module,
    config: QuantizeConfig,
    *,
    tokenizer=None,
    calibration: Sequence[torch.Tensor] | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> list[str]:
    """Quantize ``model``'s target linears in place as ``config`` says; returns the quantized layer names.

    GPTQ needs ``tokenizer``, ``calibration`` (1-D token id tensors, one sample each) and ``work_dir``
    (its temporary files); RTN needs none of them.
    """
    if isinstance(config, RTNConfig):
        return quantize_model_rtn(model, config.bits, config.group_size, config.targets, config.sym, progress)
    if isinstance(config, GPTQConfig):
        if calibration is None or work_dir is None:
            raise ValueError("GPTQ needs calibration token ids and a work_dir")
        return quantize_model_gptq(model, tokenizer, calibration, config.bits, config.group_size, config.targets,
                                   sym=config.sym, damp_percent=config.damp_percent,
                                   act_group_aware=config.act_group_aware, device=config.device, work_dir=work_dir,
                                   progress=progress)
    raise TypeError(f"unknown quantizer config {type(config).__name__}; valid: RTNConfig, GPTQConfig")


__all__ = [
    "GPTQConfig", "QuantizeConfig", "RTNConfig", "check_targets", "lowbit_from_linear", "quantize_",
    "quantize_model_gptq", "quantize_model_rtn", "rtn_quantize",
]
