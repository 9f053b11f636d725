"""Loading what ``qalora eval --model`` names: a low-bit folder (quantized base or merged model,
optionally with a QA-LoRA adapter on top), or a full-precision HF folder / ``.gguf`` / cached hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qalora.checkpoint import QUANT_CONFIG, load_lowbit_model, lowbit_layers, model_identity
from qalora.device import resolve_device, resolve_dtype
from qalora.lowbit import cache_dequantized_for
from qalora.model_io import load_base_model
from qalora.paths import resolve_model


def is_lowbit_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / QUANT_CONFIG).is_file()


def attach_adapter(model, base_folder: str | Path, adapter: str | Path) -> dict[str, Any]:
    """HOOK for base + adapter evaluation: wrap ``model``'s low-bit layers with the QA-LoRA adapter.

    Uses :func:`qalora.adapter.load_adapter_into` (which checks the adapter was tuned on this base);
    change this one function if the adapter API moves.
    """
    try:
        from qalora.adapter import load_adapter_into
    except ImportError as e:  # pragma: no cover - the adapter module ships with the tune stage
        raise RuntimeError(f"--adapter needs qalora.adapter (the QA-LoRA adapter module): {e}") from e
    config = load_adapter_into(model, adapter, base_identity=model_identity(base_folder))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return config


def load_eval_model(
    model: str | Path,
    adapter: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load what ``qalora eval --model`` names: a low-bit folder (``qalora_quant.json``: quantized base
    or merged model, optionally + ``adapter``), or a fp HF folder / ``.gguf`` / cached hub id.

    Returns ``(model, tokenizer, info)``; ``info`` is JSON-able (kind, path, dtype, device, quant).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model(str(model))  # ``embedded:smollm2-135m-instruct`` -> the unpacked GGUF
    info: dict[str, Any] = {"path": str(model), "dtype": str(torch_dtype).removeprefix("torch."), "device": device}
    if is_lowbit_folder(source):
        m, tok, quant = load_lowbit_model(source, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
        # Evaluation never changes the weights. On CPU each layer dequantizes once, not at every forward
        # (1.8x faster; one fp copy of the weights, the memory of the fp model); on a GPU the weights stay
        # low-bit and each forward dequantizes per call (the Triton kernel): no resident full-precision copy.
        cache = cache_dequantized_for(device)
        for layer in lowbit_layers(m).values():
            layer.cache_dequantized = cache
        layers = quant.get("layers", {})
        info.update(kind="lowbit", method=quant.get("method"), identity=model_identity(source),
                    bits=sorted({s["bits"] for s in layers.values()}),
                    group_size=sorted({s["group_size"] for s in layers.values()}), lowbit_layers=len(layers))
        if adapter is not None:
            cfg = attach_adapter(m, source, adapter)
            info.update(kind="lowbit+adapter", adapter=str(adapter),
                        adapter_rank=cfg.get("rank"), adapter_alpha=cfg.get("alpha"))
    else:
        if adapter is not None:
            raise ValueError(
                f"--adapter needs a quantized base (a low-bit folder with qalora_quant.json); {model} is a "
                "full-precision model: QA-LoRA adapters apply to the low-bit layers they were tuned on"
            )
        m, tok = load_base_model(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        m.to(device)
        info.update(kind="fp")
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer, trust_remote_code)
    if tok is None:
        raise ValueError(f"{model} has no tokenizer files; pass --tokenizer (a HF folder or .gguf file)")
    info["parameters"] = int(sum(p.numel() for p in m.parameters()))
    return m, tok, info


def _load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
