"""Fast inference kernels for the canonical low-bit format (float zeros), with a dispatcher.

Backends (chosen per layer by :func:`select_backend`, or forced):

- ``"cuda"`` (CUDA + a CUDA compiler, fp16/bf16 activations, 2/3/4 bit, power-of-two group >= 32):
  the weight is repacked once into tiles (:mod:`qalora.kernels.layout`); rows M <=
  ``gpu_matmul.SKINNY_MAX_M`` (32) run the skinny tensor-core kernel (``lowbit_cuda.cu``), on Hopper
  the wgmma dequant-GEMM from 17 rows on weights of many tiles (``gpu_matmul.decode_gemm_plan``); larger M
  (``gpu_matmul.large_m_path``) runs the wgmma dequant-GEMM (``lowbit_gemm.cu``, Hopper) for GLU
  weights and, on the GPUs where it measured faster, for every weight up to ``gpu_matmul.wgmma_auto_max_m``
  rows (H100: 1024); the others are dequantized with one kernel, then cuBLAS (measured faster each; a fused
  Triton dequant-GEMM, ``lowbit_gemm_triton``, is opt-in).
- ``"int4pack"`` (CPU, 4 bit): bf16/fp16 activations run torch's ``_weight_int4pack_mm_for_cpu`` in
  their dtype (scale/zero rounded to it: :func:`~qalora.kernels.cpu.int4_error_bound`); fp32
  activations run an fp32 matmul on the weight dequantized once (exact; torch's fp32 int4pack
  kernel is a slow scalar fallback), trading memory for speed.
- ``"dequant"`` (anywhere, any bits): the reference dequant then ``F.linear``.

The CUDA extension is compiled on first use (``cuda_ext``), so this package imports anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qalora.kernels.cpu import dequant_linear, int4_linear, int4pack_fits
from qalora.kernels.cuda_ext import cuda_kernels_available
from qalora.kernels.layout import check_kernel_shape
from qalora.kernels.prepared import PreparedWeight, concat_layers, prepare_layer, prepare_weight, reference_dequant
from qalora.lowbit import LowBitLinear

BACKENDS = ("auto", "cuda", "int4pack", "dequant")


def triton_available() -> bool:
    """True when CUDA is up and triton imports (the attention/norm kernels of :mod:`qalora.decoder`)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_shape_ok(bits: int, group_size: int, in_features: int) -> bool:
    try:
        check_kernel_shape(in_features, bits, group_size)
    except ValueError:
        return False
    return True


def select_backend(device: torch.device | str, bits: int, group_size: int, in_features: int) -> str:
    """The fastest backend that takes this layer on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_kernels_available() and _kernel_shape_ok(bits, group_size, in_features):
            return "cuda"
        return "dequant"
    if int4pack_fits(bits, group_size, in_features):
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
        # LowBitLinear's own constructor (its checks, its attributes) on the meta device, then the
        # original layer's buffers in place of the empty ones: nothing is copied.
        new = cls(layer.in_features, layer.out_features, layer.bits, layer.group_size, bias=layer.bias is not None,
                  device="meta")
        for name in ("qweight", "scales", "zeros", *(("bias",) if layer.bias is not None else ())):
            setattr(new, name, getattr(layer, name))
        if backend == "auto":
            backend = select_backend(layer.qweight.device, layer.bits, layer.group_size, layer.in_features)
        if backend not in BACKENDS[1:]:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        new.backend = backend
        new.prepared = prepare_layer(layer, cpu_int4=backend == "int4pack")
        if backend == "cuda" and new.prepared.tiles is None:
            raise ValueError(f"cuda backend cannot take bits={layer.bits}, group_size={layer.group_size}")
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
    if backend == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and pw.tiles is not None and not pw.glu:
        from qalora.kernels import gpu_matmul

        return gpu_matmul.matmul(x, pw)
    if backend == "int4pack" and pw.cpu_int4 is not None:
        if x.dtype == torch.float32:
            # torch's fp32 int4pack CPU kernel is a scalar fallback (20x slower than a dense fp32
            # matmul at M=1, 86x at M=128): dequantize once and keep the exact fp32 GEMM instead.
            return F.linear(x, pw.dense_weight(), pw.ref_bias)
        packed, sz = pw.cpu_int4
        return int4_linear(x, packed, sz, pw.group_size, pw.ref_bias, exact=False)
    if pw.glu:
        raise ValueError("a glu-prepared weight runs on the cuda backend only (gpu_matmul.matmul)")
    return dequant_linear(x, pw.qweight, pw.scales, pw.zeros, pw.bits, pw.group_size, pw.ref_bias)


def prepare_for_inference(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every ``LowBitLinear`` of ``model`` (in place) for a :class:`PreparedLowBitLinear`
    on its current device; returns the model. Idempotent."""
    from qalora.model_io import set_submodule

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowBitLinear) and not isinstance(mod, PreparedLowBitLinear):
            set_submodule(model, name, PreparedLowBitLinear.from_layer(mod, backend))
    return model


__all__ = [
    "BACKENDS", "PreparedLowBitLinear", "PreparedWeight", "concat_layers", "cuda_kernels_available", "lowbit_linear",
    "prepare_for_inference", "prepare_layer", "prepare_weight", "reference_dequant", "select_backend",
    "triton_available",
]
