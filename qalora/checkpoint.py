"""Save and load a low-bit model folder in the canonical format.

Folder layout (``int4.g64`` style names are up to the caller)::

    config.json            HF model config (architecture to rebuild)
    tokenizer files        so the folder is self-contained for generate() and lm-eval
    model.safetensors      every tensor: LowBitLinear buffers (qweight/scales/zeros[/bias]) and the
                           unquantized rest (embeddings, norms, lm_head; in bf16/fp16 where that is
                           exact: storage_state_dict); tied copies stored once
    qalora_quant.json      format version, per-layer bits/group/shape, tied keys, method
    manifest.json          inputs, params, versions, sha256 of every file and every tensor
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qalora.lowbit import LowBitLinear
from qalora.manifest import atomic_output_dir, read_json, sha256_file, sha256_tensor, write_json_atomic, write_manifest
from qalora.model_io import defuse_experts, set_submodule

FORMAT = "qalora-lowbit"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
QUANT_CONFIG = "qalora_quant.json"


def lowbit_layers(model: nn.Module) -> dict[str, LowBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        n: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
            "out_features": m.out_features, "bias": m.bias is not None}
        for n, m in lowbit_layers(model).items()
    }


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors kept once; returns (tensors, {dropped_key: kept_key})."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    return tensors, tied


# The 16-bit types a full-precision tensor is stored in when one holds every value exactly (first that does).
STORAGE_DTYPES = (torch.bfloat16, torch.float16)


def storage_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """What a low-bit folder stores: :func:`unique_state_dict`, with every fp32 tensor that is not a
    low-bit layer's canonical buffer (embeddings, norms, untied head) in the first of
    :data:`STORAGE_DTYPES` that holds all its values exactly, so a bf16 source's embeddings take half the
    bytes and nothing changes by a bit. Returns (tensors, tied, names kept in fp32 because no 16-bit type
    holds them: e.g. a GGUF source's dequantized embedding)."""
    tensors, tied = unique_state_dict(model)
    layers = layer_specs(model)
    kept = []
    for key, t in tensors.items():
        if t.dtype != torch.float32 or _is_lowbit_buffer(key, layers):
            continue
        narrow = next((n for n in (t.to(dt) for dt in STORAGE_DTYPES) if torch.equal(n.to(torch.float32), t)), None)
        if narrow is None:
            kept.append(key)
        else:
            tensors[key] = narrow
    return tensors, tied, kept


def save_lowbit_model(
    model: PreTrainedModel,
    tokenizer,
    out: str | Path,
    *,
    method: str,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    extra_quant: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the folder atomically; returns its manifest."""
    specs = layer_specs(model)
    if not specs:
        raise ValueError("model has no LowBitLinear layers: quantize it first")
    tensors, tied, kept = storage_state_dict(model)
    with atomic_output_dir(out, stage) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        quant = {"format": FORMAT, "version": FORMAT_VERSION, "method": method, "tied": tied,
                 "layers": specs, **(extra_quant or {})}
        write_json_atomic(tmp / QUANT_CONFIG, quant)
        manifest = write_manifest(
            tmp, stage, params, inputs,
            extra={"tensors": {k: sha256_tensor(v) for k, v in tensors.items()}, "metrics": metrics or {},
                   # where exactness needed fp32 for an unquantized tensor (storage_state_dict)
                   "storage": {"float32_kept": len(kept), "float32_kept_first": kept[:8],
                               "dtypes": dict(sorted(Counter(str(t.dtype).removeprefix("torch.")
                                                             for t in tensors.values()).items()))}},
        )
    return manifest


def read_quant_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    quant = read_json(folder / QUANT_CONFIG, "low-bit model config")
    if quant.get("format") != FORMAT:
        raise ValueError(f"{folder / QUANT_CONFIG}: format {quant.get('format')!r} is not {FORMAT!r}")
    if quant.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: format version {quant.get('version')} unsupported (this qalora reads {FORMAT_VERSION})")
    return quant


def load_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete low-bit model folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e


def load_lowbit_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    verify: bool = True,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """Rebuild the transformers model with LowBitLinear layers; returns (model, tokenizer, quant config).

    ``dtype`` applies to the unquantized tensors (embeddings, norms); LowBitLinear keeps its
    canonical buffer dtypes and computes in the activation dtype. ``verify`` checks every
    tensor's sha256 against manifest.json.
    """
    folder = Path(folder)
    quant = read_quant_config(folder)
    tensors = load_tensors(folder)
    if verify:
        expected = read_json(folder / "manifest.json", "manifest").get("tensors", {})
        bad = [k for k, v in tensors.items() if expected.get(k) != sha256_tensor(v)]
        if bad or set(expected) != set(tensors):
            raise ValueError(f"{folder / WEIGHTS} does not match manifest.json (tensors {bad[:5]} differ): corrupt folder")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # Parameters on meta (no random init of a big model), buffers such as rotary inv_freq real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    defuse_experts(model)  # MoE: stacked experts -> the per-expert layers the folder stores (model_io)
    for name, spec in quant["layers"].items():
        layer = LowBitLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                             bias=spec["bias"], name=name)
        set_submodule(model, name, layer)
    for key, t in tensors.items():
        if t.is_floating_point() and not _is_lowbit_buffer(key, quant["layers"]):
            tensors[key] = t.to(dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in quant["tied"]]
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for {config.model_type}")
    if quant["tied"]:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"{folder}: no weights for {leftover[:5]}")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer, quant


def _is_lowbit_buffer(key: str, layers: dict[str, Any]) -> bool:
    prefix, _, leaf = key.rpartition(".")
    return prefix in layers and leaf in ("qweight", "scales", "zeros", "bias")


def model_identity(folder: str | Path) -> str:
    """sha256 of the folder's weights file: the identity an adapter records for its base."""
    return sha256_file(Path(folder) / WEIGHTS)


def folder_input(folder: str | Path) -> dict[str, str]:
    """How a stage's manifest names a low-bit model folder it read: path and :func:`model_identity`."""
    return {"path": str(folder), "sha256": model_identity(folder)}
