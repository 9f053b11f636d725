"""Load a full-precision base model: a HF folder, a hub id (local cache only) or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Projections of LLaMA-style blocks; the default QA-LoRA / quantization targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_base_model(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer).

    ``source``: a folder with config.json + *.safetensors, a ``.gguf`` file (dequantized to
    ``dtype`` by transformers), or a hub id that must already be in the local HF cache (no
    network at run time). Pickle checkpoints (*.bin) are refused: safetensors only.
    """
    source = str(source)
    path = Path(source)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a HF model folder")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} has no *.safetensors weights; qalora loads safetensors only "
                "(convert pickle checkpoints with `transformers` save_pretrained(safe_serialization=True))"
            )
        where = source
    elif path.suffix or path.is_absolute() or source.startswith("."):
        raise FileNotFoundError(f"model not found: {source} (expected a HF folder, a .gguf file or a hub id)")
    else:
        where, kwargs["local_files_only"] = source, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=not source.endswith(".gguf") or None, **kwargs)
    except OSError as e:
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(
                f"hub id {source!r} is not in the local HF cache and no network is used at run time; "
                "pass a local folder or .gguf file"
            ) from e
        raise
    model.eval()
    return model, tokenizer


def find_linear_targets(model: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, torch.nn.Module]:
    """Modules whose last name component is in ``targets`` (e.g. ``q_proj``), in model order."""
    found = {n: m for n, m in model.named_modules() if n.split(".")[-1] in set(targets)}
    if not found:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"no module matches target_modules={list(targets)}; linear layers here: {names}")
    return found


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def source_identity(source: str | Path) -> str:
    """A content hash of a model source: the file (GGUF), the folder's config + safetensors, or the id."""
    from qalora.manifest import sha256_bytes, sha256_file

    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        parts = [f"{f.name}:{sha256_file(f)}" for f in sorted(path.iterdir())
                 if f.suffix in (".safetensors", ".json") and f.is_file()]
        return sha256_bytes("\n".join(parts).encode())
    return sha256_bytes(str(source).encode())
