"""The QA-LoRA adapter: LoRA on group-pooled inputs over a frozen LowBitLinear (docs/design.md, "The math").

    y = W_hat x + (alpha / r) * B @ A @ P(x),     P(x)_k = sum_{i in group k} x_i   (sum pooling)

A [r, L] and B [D_out, r] are fp32 parameters. Sum pooling (paper Algorithm 1) makes the merge
exact without a factor: B A P(x) = dW x with dW[j, i] = (alpha/r) (B A)[j, i // g].

Adapter folder: ``adapter.safetensors`` (``<layer>.lora_A`` / ``<layer>.lora_B``),
``adapter_config.json`` (rank, alpha, pooling, per-layer shapes, identity of the base) and
``manifest.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qalora.lowbit import LowBitLinear
from qalora.manifest import read_json, sha256_file, write_json_atomic
from qalora.model_io import find_linear_targets, set_submodule

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
POOLING = "sum"


class LoRABranch(nn.Module):
    """A frozen ``base`` plus a trainable low-rank branch on pooled inputs:

        y = base(x) + (alpha / r) * B @ A @ pool(dropout(x))      A [r, L] and B [D_out, r], fp32

    Subclasses say what ``pool`` is and so what ``L`` is: QA-LoRA's group sums (L = D_in / g), or plain
    LoRA's identity (:class:`qalora.lora.LoRALinear`, L = D_in).
    """

    pooling = "none"
    group_size = 1

    def __init__(self, base: nn.Module, pooled_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, pooled_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's LoRA init: A Kaiming-uniform over its fan-in, B zero, so training starts at the base.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pooled = self.pool(self.dropout(x)).to(self.lora_A.dtype)
        lora = (pooled @ self.lora_A.t()) @ self.lora_B.t()
        return y + (self.scaling * lora).to(y.dtype)


class QALoRALinear(LoRABranch):
    """Wraps a frozen :class:`LowBitLinear` ``base`` with a trainable QA-LoRA branch (sum pooling)."""

    pooling = POOLING

    def __init__(self, base: LowBitLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, base.num_groups, base.out_features, rank, alpha, dropout, base.scales.device)
        self.group_size = base.group_size

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D_in] -> [..., L]: sum over each contiguous group of g inputs."""
        return x.unflatten(-1, (self.base.num_groups, self.group_size)).sum(-1)

    def delta_zeros(self) -> torch.Tensor:
        """fp64 [D_out, L]: the amount the merge subtracts from the zeros, (alpha/r)(B A) / s."""
        ba = self.lora_B.detach().double() @ self.lora_A.detach().double()
        return self.scaling * ba / self.base.scales.double()


def adapter_identity(folder: str | Path) -> str:
    """sha256 of the adapter's weights file."""
    return sha256_file(Path(folder) / ADAPTER_WEIGHTS)


def adapter_layers(model: nn.Module) -> dict[str, LoRABranch]:
    """Every adapted layer (QA-LoRA or plain LoRA), in module order: the order of the trainable tensors."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRABranch)}


def apply_qalora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...]
) -> dict[str, QALoRALinear]:
    """Wrap every target LowBitLinear in place; freeze everything else. Returns the wrappers."""
    wrapped = {}
    for name, mod in find_linear_targets(model, targets).items():
        if not isinstance(mod, LowBitLinear):
            raise TypeError(
                f"{name} is {type(mod).__name__}, not a quantized LowBitLinear: QA-LoRA adapts low-bit "
                "layers only (quantize the model first, or drop it from targets)"
            )
        wrapped[name] = QALoRALinear(mod, rank, alpha, dropout)
        set_submodule(model, name, wrapped[name])
    return train_only(model, wrapped)


def train_only(model: nn.Module, wrapped: dict[str, LoRABranch]) -> dict[str, LoRABranch]:
    """Freeze every parameter of ``model`` except the adapters' A and B; returns ``wrapped``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in wrapped.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapter_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, base_identity: str, **extra: Any) -> dict[str, Any]:
    layers = adapter_layers(model)
    first = next(iter(layers.values()))
    return {
        "pooling": first.pooling,
        "rank": first.rank,
        "alpha": first.alpha,
        "base_identity": base_identity,
        "layers": {n: {"out_features": m.out_features, "num_groups": m.lora_A.shape[1],
                       "group_size": m.group_size} for n, m in layers.items()},
        **extra,
    }


def save_adapter_files(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS))
    write_json_atomic(folder / ADAPTER_CONFIG, config)


def load_adapter_into(model: nn.Module, folder: str | Path, base_identity: str | None = None,
                      apply=None) -> dict[str, Any]:
    """Wrap ``model``'s layers with the adapter saved in ``folder``; returns its config.

    ``base_identity`` (sha256 of the base's weights) guards against an adapter tuned on another base.
    ``apply(model, rank, alpha, dropout, targets)`` wraps the layers: :func:`apply_qalora` (default, low-bit
    layers) or :func:`qalora.lora.apply_lora` (float layers).
    """
    folder = Path(folder)
    config = read_json(folder / ADAPTER_CONFIG, "adapter config")
    if base_identity is not None and config.get("base_identity") != base_identity:
        raise ValueError(
            f"adapter {folder} was tuned on base {str(config.get('base_identity'))[:12]}…, "
            f"not on this base ({base_identity[:12]}…): pass the quantized base it was tuned on"
        )
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: incomplete adapter folder")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    layers = (apply or apply_qalora)(model, config["rank"], config["alpha"], 0.0,
                                     sorted({n.split(".")[-1] for n in config["layers"]}))
    if set(layers) != set(config["layers"]):
        raise ValueError(f"adapter {folder} layers do not match the model's: "
                         f"{sorted(set(layers) ^ set(config['layers']))[:5]}")
    for name, layer in layers.items():
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None or a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
            raise ValueError(f"adapter {folder}: tensors for {name} missing or of the wrong shape "
                             f"(need A {tuple(layer.lora_A.shape)}, B {tuple(layer.lora_B.shape)})")
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    return config
