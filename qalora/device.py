"""Where and in what precision a stage computes: the one place ``"auto"`` is resolved.

Every stage that takes a ``device`` (tune, eval, bench, the pipeline's benchmark stage, the served
pyfunc model) resolves it here, and every dtype name (``fp32``, ``bfloat16``, ...) maps to torch
through :data:`DTYPES`.
"""

from __future__ import annotations

import torch

# Accepted dtype names, short and long.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str | None = "auto", *, key: str = "device") -> str:
    """``"auto"`` (or None): ``"cuda"`` when CUDA is available, else ``"cpu"``. ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` are returned as given; a CUDA device where there is none is refused, naming ``key``
    (the flag or params key the value came from)."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{key}={device} but no CUDA device is available here; use auto or cpu")
    return device


def auto_dtype(device: str | torch.device) -> str:
    """The compute dtype ``"auto"`` means on ``device``: bf16 on CUDA; fp32 elsewhere (exact, and
    bf16 matmuls are ~30x slower than fp32 on AVX2 CPUs)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def dtype_name(name: str, device: str | torch.device = "cpu") -> str:
    """``name`` checked against :data:`DTYPES`, with ``"auto"`` resolved for ``device``."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}; valid: auto, {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` (see :func:`dtype_name`)."""
    return DTYPES[dtype_name(name, device)]


def device_identity(device: str) -> str:
    """What a stage's result depends on about ``device`` (a resolved name): the GPU model, or "cpu"
    (whose numerics the stage key records separately: :mod:`qalora.numerics`). Part of cache keys."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
