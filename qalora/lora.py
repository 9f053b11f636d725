"""Plain LoRA over a frozen float base: the reference methods the accuracy sweep compares QA-LoRA with.

    y = W x + (alpha / r) * B @ A @ x        A [r, D_in], B [D_out, r] fp32 (no pooling)

``base`` says what ``W`` is while tuning:

* ``fp``:  the source model's own weights: LoRA on the unquantized model, the upper reference.
* ``nf4``: their NF4 round trip, QLoRA's frozen base (bitsandbytes ``quantize_4bit``: NormalFloat4,
  blocks of 64, double-quantized absmax constants, as in the QLoRA paper). QLoRA keeps the 4-bit codes
  and dequantizes per matmul; on the CPU we keep the dequantized weight instead: the same numbers in
  the forward, without bitsandbytes' CPU 4-bit matmul.

:func:`merge_lora` folds the adapter into the *source's* weights, ``W' = W + (alpha/r) B A``, and writes a
full-precision HF folder: the QLoRA-then-GPTQ recipe (QA-LoRA paper, Sec. 4) merges into the 16-bit model
and then quantizes that with GPTQ; the NF4 codes are not kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from qalora.adapter import (
    ADAPTER_CONFIG, LoRABranch, adapter_identity, adapter_layers, load_adapter_into, train_only,
)
from qalora.checkpoint import unique_state_dict
from qalora.config import TuneParams
from qalora.device import DTYPES, resolve_device
from qalora.manifest import atomic_output_dir, check_output_path, read_json, sha256_bytes, write_manifest
from qalora.model_io import find_linear_targets, load_base_model, set_submodule, source_identity
from qalora.tune import resolve_dtype, train_adapter, training_examples

Base = Literal["fp", "nf4"]
BASES: tuple[str, ...] = ("fp", "nf4")
NF4_BLOCK = 64  # QLoRA's block size for the first quantization


class LoRALinear(LoRABranch):
    """A frozen ``nn.Linear`` plus a LoRA branch on its unpooled input."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, base.in_features, base.out_features, rank, alpha, dropout, base.weight.device)

    def delta_weight(self) -> torch.Tensor:
        """fp64 [D_out, D_in]: what the merge adds to the weight, (alpha/r) B A."""
        return self.scaling * (self.lora_B.detach().double() @ self.lora_A.detach().double())


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """The weight QLoRA's forward sees: ``weight`` [D_out, D_in] quantized to NF4 by bitsandbytes (blocks of
    64, double-quantized constants) and dequantized back, in ``weight``'s dtype."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # a dependency of the package; say what is missing rather than fail inside
        raise RuntimeError(f"the nf4 base (QLoRA) needs bitsandbytes: {e}") from e
    codes, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=NF4_BLOCK,
                                      compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(codes, state).to(weight.dtype).reshape(weight.shape)


def lora_base_identity(source_id: str, base: str | None) -> str:
    """The frozen base of a plain-LoRA tune: the source *and* what was done to it (an nf4 tune is another
    base than an fp one)."""
    return sha256_bytes(f"{source_id}:{base}".encode())


@torch.no_grad()
def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...],
               base: Base = "fp") -> dict[str, LoRALinear]:
    """Wrap every target ``nn.Linear`` (its weight NF4-round-tripped when ``base`` is nf4); freeze the rest."""
    if base not in BASES:
        raise ValueError(f"LoRA base {base!r} is not one of {list(BASES)}")
    wrapped = {}
    for name, mod in find_linear_targets(model, targets).items():
        if type(mod) is not nn.Linear:
            raise TypeError(f"{name} is {type(mod).__name__}, not a float nn.Linear: plain LoRA tunes "
                            "full-precision models (QA-LoRA tunes quantized ones)")
        if base == "nf4":
            mod.weight.copy_(nf4_roundtrip(mod.weight))
        wrapped[name] = LoRALinear(mod, rank, alpha, dropout)
        set_submodule(model, name, wrapped[name])
    return train_only(model, wrapped)


def tune_lora(source: str | Path, data_path: str | Path, out_dir: str | Path, params: TuneParams, base: Base = "fp",
              *, trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tune a plain LoRA adapter on the full-precision ``source`` (over its ``base`` weights) with the
    same loop, data order, schedule and checkpoints as QA-LoRA (:func:`qalora.tune.train_adapter`)."""
    check_output_path(out_dir, "tune")
    device = torch.device(resolve_device(params.device, key="tune.device"))
    dtype = resolve_dtype(params, device)
    model, tokenizer = load_base_model(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    identity = lora_base_identity(source_identity(source), base)
    examples = training_examples(tokenizer, source, data_path, params)
    torch.manual_seed(params.seed)
    apply_lora(model, params.rank, params.alpha, params.dropout, params.targets, base)
    return train_adapter(model, tokenizer, examples, data_path, out_dir, params,
                         {"path": str(source), "sha256": identity}, device, dtype,
                         compute={"lora_base": base}, config={"lora_base": base}, progress=progress,
                         desc=f"LoRA tune ({base} base)")


@torch.no_grad()
def merge_lora(source: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
               trust_remote_code: bool = False) -> dict[str, Any]:
    """``W + (alpha/r) B A`` (fp64, rounded once) into the source's weights; writes a full-precision HF
    folder (safetensors, the tokenizer, a manifest) that quantize and evaluate take like any source."""
    check_output_path(out_dir, "merge")
    adapter_dir = Path(adapter_dir)
    config = read_json(adapter_dir / ADAPTER_CONFIG, "adapter config")
    if config.get("pooling") != LoRALinear.pooling:
        raise ValueError(f"{adapter_dir} is a {config.get('pooling')!r}-pooled (QA-LoRA) adapter: merge it into "
                         "its quantized base with `qalora merge`, not into a float model")
    model, tokenizer = load_base_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    source_id = source_identity(source)
    # the adapter must have been tuned on this source (over its fp or its NF4 weights: tune_lora's identity)
    load_adapter_into(model, adapter_dir, base_identity=lora_base_identity(source_id, config.get("lora_base")),
                      apply=apply_lora)
    layers = adapter_layers(model)
    for name, layer in layers.items():
        weight = layer.base.weight
        weight.copy_((weight.double() + layer.delta_weight()).to(weight.dtype))
        set_submodule(model, name, layer.base)
    # Written by hand, not save_pretrained: transformers refuses to serialize a model it loaded from GGUF
    # (the embedded default), although after dequantization it is a plain fp32 model.
    tensors, _tied = unique_state_dict(model)
    with atomic_output_dir(out_dir, "merge") as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        return write_manifest(tmp, "merge", {}, inputs={
            "source": {"path": str(source), "sha256": source_id},
            "adapter": {"path": str(adapter_dir), "sha256": adapter_identity(adapter_dir)}},
            extra={"metrics": {"merged_layers": float(len(layers))}, "lora_base": config.get("lora_base")})


__all__ = ["BASES", "LoRALinear", "apply_lora", "merge_lora", "nf4_roundtrip", "tune_lora"]
