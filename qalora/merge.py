"""Fold a QA-LoRA adapter into the quantized zeros: z' = z - (alpha/r)(B A) / s.

Codes and scales are not touched, so the merged model is exactly as low-bit as the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qalora.adapter import QALoRALinear, adapter_identity, adapter_layers, load_adapter_into
from qalora.checkpoint import load_lowbit_model, model_identity, save_lowbit_model
from qalora.model_io import set_submodule


@torch.no_grad()
def merge_adapter_into_zeros(model: nn.Module) -> dict[str, float]:
    """Replace every QALoRALinear in ``model`` by its base with moved zeros; returns stats.

    The shift is computed in fp64 and rounded once to the fp32 zeros.
    """
    layers = adapter_layers(model)
    if not layers or not all(isinstance(m, QALoRALinear) for m in layers.values()):
        raise ValueError("model has no QA-LoRA layers to merge (plain LoRA merges into float weights: qalora.lora)")
    max_shift = 0.0
    for name, layer in layers.items():
        shift = layer.delta_zeros()
        base = layer.base
        base.zeros.copy_((base.zeros.double() - shift).to(torch.float32))
        base.invalidate_cache()
        max_shift = max(max_shift, shift.abs().max().item())
        set_submodule(model, name, base)
    return {"merged_layers": float(len(layers)), "max_abs_zero_shift": max_shift}


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Load base + adapter, merge, write the merged low-bit folder; returns its manifest."""
    model, tokenizer, quant = load_lowbit_model(base_dir)
    base_id = model_identity(base_dir)
    load_adapter_into(model, adapter_dir, base_identity=base_id)
    stats = merge_adapter_into_zeros(model)
    return save_lowbit_model(
        model, tokenizer, out_dir,
        method=f"{quant['method']}+qalora-merge", stage="merge", params={},
        inputs={"base": {"path": str(base_dir), "sha256": base_id},
                "adapter": {"path": str(adapter_dir), "sha256": adapter_identity(adapter_dir)}},
        extra_quant={"merged_from": base_id}, metrics=stats,
    )
