"""Fast inference kernels for the canonical low-bit format (float zeros), with a dispatcher.

Backends (chosen per layer by :func:`select_backend`, or forced):

- ``"triton"`` (CUDA, fp16/bf16 activations, 2/3/4 bit, group % 32 == 0): the weight is repacked
  once into planes (:mod:`qalora.kernels.layout`); rows M <= ``gpu.SKINNY_MAX_M`` (64) run the
  skinny kernel (FMA path at M == 1, tensor cores above), larger M the large-M path
  (``gpu.LARGE_M_PATH``: fused dequant+matmul kernel, or dequant then cuBLAS).
- ``"int4pack"`` (CPU, 4 bit): torch's ``_weight_int4pack_mm_for_cpu`` with fp32 scale/zero.
- ``"dequant"`` (anywhere, any bits): the reference dequant then ``F.linear``.

Triton is imported only when the triton backend runs, so this package imports without it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qalora.kernels.cpu import dequant_linear, int4_linear, int4pack_available
from qalora.kernels.layout import BLOCK, KERNEL_BITS
from qalora.kernels.prepared import PreparedWeight, concat_layers, prepare_layer, prepare_weight, reference_dequant
from qalora.lowbit import LowBitLinear

BACKENDS = ("auto", "triton", "int4pack", "dequant")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when CUDA is up and triton imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device | str, bits: int, group_size: int, in_features: int) -> str:
    """The fastest backend that takes this layer on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if triton_available() and bits in KERNEL_BITS and group_size % BLOCK == 0 and in_features % group_size == 0:
            return "triton"
        return "dequant"
    if bits == 4 and int4pack_available() and in_features % 2 == 0 and group_size in (32, 64, 128, 256):
        return "int4pack"
    return "dequant"


class PreparedLowBitLinear(LowBitLinear):
    """A ``LowBitLinear`` whose forward runs a fast backend.

    It shares the original layer's buffers (same state dict, still a ``LowBitLinear``); the
    kernel layout lives in ``self.prepared`` (plain attributes: prepare after moving the model).
    fp32 activations on CUDA use the reference path (the kernels compute in fp16/bf16).
    """

    backend: str
    prepared: PreparedWeight

    @classmethod
    def from_layer(cls, layer: LowBitLinear, backend: str = "auto") -> "PreparedLowBitLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.bits, new.group_size = layer.bits, layer.group_size
        for name in ("qweight", "scales", "zeros"):
            new.register_buffer(name, getattr(layer, name))
        if layer.bias is not None:
            new.register_buffer("bias", layer.bias)
        else:
            new.bias = None
        new._cached, new.cache_dequantized = None, False
        if backend == "auto":
            backend = select_backend(layer.qweight.device, layer.bits, layer.group_size, layer.in_features)
        if backend not in BACKENDS[1:]:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        new.backend = backend
        new.prepared = prepare_layer(layer, cpu_int4=backend == "int4pack")
        if backend == "triton" and new.prepared.planes is None:
            raise ValueError(f"triton backend cannot take bits={layer.bits}, group_size={layer.group_size}")
        if backend == "int4pack" and new.prepared.cpu_int4 is None:
            raise ValueError("int4pack backend needs 4-bit weights, even D_in, group in 32..256 and torch's kernel")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_linear(x, self.prepared, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


def lowbit_linear(x: torch.Tensor, w: PreparedWeight | LowBitLinear, backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K]; returns x's dtype.

    ``w`` is a :class:`PreparedWeight` (repacked once) or a ``LowBitLinear`` (repacked on every
    call: convenient, slow). ``backend="auto"`` picks by device, bits and shape.
    """
    pw = prepare_layer(w, cpu_int4=x.device.type == "cpu") if isinstance(w, LowBitLinear) else w
    if backend == "auto":
        backend = select_backend(x.device, pw.bits, pw.group_size, pw.in_features)
    if backend == "triton" and x.dtype in (torch.float16, torch.bfloat16) and pw.planes is not None:
        from qalora.kernels import gpu

        return gpu.matmul(x, pw)
    if backend == "int4pack" and pw.cpu_int4 is not None:
        packed, sz = pw.cpu_int4
        return int4_linear(x, packed, sz, pw.group_size, pw.bias)
    return dequant_linear(x, pw.qweight, pw.scales, pw.zeros, pw.bits, pw.group_size, pw.bias)


def prepare_for_inference(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every ``LowBitLinear`` of ``model`` (in place) for a :class:`PreparedLowBitLinear`
    on its current device; returns the model. Idempotent."""
    from qalora.model_io import set_submodule

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowBitLinear) and not isinstance(mod, PreparedLowBitLinear):
            set_submodule(model, name, PreparedLowBitLinear.from_layer(mod, backend))
    return model


__all__ = [
    "BACKENDS", "PreparedLowBitLinear", "PreparedWeight", "concat_layers", "lowbit_linear", "prepare_for_inference",
    "prepare_layer", "prepare_weight", "reference_dequant", "select_backend", "triton_available",
]
