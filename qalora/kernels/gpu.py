"""CUDA entry points (Triton). Importing this module imports triton: do it lazily.

Shapes: x [M, K] fp16/bf16 (row stride free, unit column stride), weights as
:class:`~qalora.kernels.prepared.PreparedWeight`, outputs [M, N].
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import triton.language as tl

from qalora.kernels import triton_kernels as tk
from qalora.kernels.prepared import PreparedWeight

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

SKINNY_MAX_M = 64  # M above this goes to the large-M path


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    nb: int = 16            # 32-code blocks per iteration
    split_k: int = 1
    block_m: int = 1        # 1: FMA path; >= 16: tensor-core path
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False  # M == 1 path only
    scalar: bool = False    # M == 1 path only


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 128
    nb: int = 4             # BK = 32 * nb
    group_m: int = 8
    swap: bool = True       # W as the A operand (registers); swap=False fails to compile at nb=2
    num_warps: int = 8
    num_stages: int = 3


# Tuned entries, keyed (bits, M bucket, N, K); filled from benchmarks/kernel_sweep.py on an H100.
GEMV_TUNED: dict[tuple[int, int, int, int], GemvConfig] = {}
GEMM_TUNED: dict[tuple[int, int, int], GemmConfig] = {}


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():  # the Triton interpreter on CPU
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """An int32 [1] tensor holding 1 (read by the SCALAR gemv variant), one per device."""
    t = _ONES.get(device)
    if t is None:
        t = _ONES[device] = torch.ones(1, dtype=torch.int32, device=device)
    return t


def m_bucket(m: int) -> int:
    """1, 16, 32 or 64: the skinny kernel's M tile for ``m`` rows."""
    if m <= 1:
        return 1
    return max(16, 1 << (m - 1).bit_length())


def gemv_config(m: int, n: int, k: int, bits: int, accumulate: bool, device_index: int = 0) -> GemvConfig:
    """Tuned config when known, else a heuristic: enough programs to fill the GPU ~4x."""
    mb = m_bucket(m)
    # untuned 3/2-bit shapes borrow the 4-bit tuning (same loop structure, fewer planes)
    cfg = GEMV_TUNED.get((bits, mb, n, k)) or GEMV_TUNED.get((4, mb, n, k))
    if cfg is None:
        if mb == 1:
            cfg = GemvConfig(block_n=16, nb=32, num_warps=4, prefetch=True, scalar=True)
        else:
            cfg = GemvConfig(block_n=64, nb=16, block_m=mb, num_warps=4)
        nbt = k // 32
        target = 4 * _num_sms(device_index)
        progs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
        split = 1
        while progs * split < target and nbt // (split * 2) >= cfg.nb:
            split *= 2
        cfg = replace(cfg, split_k=split)
    return cfg


def gemv(
    x: torch.Tensor,
    pw: PreparedWeight,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    act: bool = False,
    x_perm: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
    cfg: GemvConfig | None = None,
) -> torch.Tensor:
    """Skinny low-bit matmul: returns out[M, N] = x @ W^T (+ bias).

    - ``act``: x is [M, 2K] = [gate | up] and the kernel uses silu(gate) * up as its input.
    - ``x_perm``: x (each half when ``act``) is slot-major (:func:`qalora.kernels.layout.xperm`).
    - ``accumulate``: ``out`` is fp32 [M, N] and receives out += x @ W^T through atomics (a
      residual stream); otherwise ``out`` (optional) is [M, N] in ``dtype``.
    - ``norm_weight`` (fp32 [K], laid out like x): x is an fp32 residual stream and the input is
      rmsnorm(x, eps) * norm_weight, fused into the kernel.
    - ``dtype``: compute/output dtype (fp16/bf16); defaults to x's dtype.
    """
    m = x.shape[0]
    k, n = pw.in_features, pw.out_features
    if x.shape[1] != (2 * k if act else k) or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} does not match D_in={k} (act={act})")
    dtype = dtype or x.dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"compute dtype must be fp16 or bf16, not {dtype}")
    if cfg is None:
        cfg = gemv_config(m, n, k, pw.bits, accumulate, x.device.index or 0)
    if accumulate:
        if out is None or out.dtype != torch.float32:
            raise ValueError("accumulate=True needs an fp32 out tensor")
        target, atomic = out, True
    elif cfg.split_k > 1:
        target, atomic = torch.zeros(m, n, device=x.device, dtype=torch.float32), True
    else:
        if out is None:
            out = torch.empty(m, n, device=x.device, dtype=dtype)
        target, atomic = out, False
    if cfg.block_m > 1 and (act or norm_weight is not None) and cfg.num_stages > 1:
        # software pipelining plus the fused prologues ran 2-4x slower on H100 (RESULTS.md)
        cfg = replace(cfg, num_stages=1)
    if cfg.block_m > 1 and os.environ.get("QALORA_DOT_STAGES"):  # experiment knob
        cfg = replace(cfg, num_stages=int(os.environ["QALORA_DOT_STAGES"]))
    grid = (triton_cdiv(n, cfg.block_n), cfg.split_k, triton_cdiv(m, cfg.block_m))
    tk._gemv_kernel[grid](
        x, pw.planes, pw.coef, pw.bias if pw.bias is not None else pw.coef, target,
        norm_weight if norm_weight is not None else pw.coef, _one(x.device),
        m, n, x.stride(0), target.stride(0), pw.planes.stride(0), pw.stride_wn, k, eps,
        NBT=pw.nbt, BITS=pw.bits, GPB=pw.group_size // 32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NB=cfg.nb, SPLIT_K=cfg.split_k,
        X_PERM=x_perm, ACT=act, NORM=norm_weight is not None, ATOMIC=atomic,
        HAS_BIAS=pw.bias is not None, DOT=cfg.block_m > 1, DOT_DTYPE=_TL_DTYPES[dtype],
        PREFETCH=cfg.prefetch and cfg.block_m == 1, SCALAR=cfg.scalar and cfg.block_m == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if target is not out:
        if out is None:
            return target.to(dtype)
        out.copy_(target)
    return out


def gemm(x: torch.Tensor, pw: PreparedWeight, *, out: torch.Tensor | None = None,
         cfg: GemmConfig | None = None) -> torch.Tensor:
    """Large-M fused dequant + matmul: x [M, K] -> [M, N] in x's dtype."""
    m = x.shape[0]
    k, n = pw.in_features, pw.out_features
    if x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} does not match D_in={k}")
    cfg = cfg or GEMM_TUNED.get((pw.bits, n, k)) or GemmConfig()
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n),)
    tk._gemm_kernel[grid](
        x, pw.planes, pw.coef, pw.bias if pw.bias is not None else pw.coef, out,
        m, n, x.stride(0), out.stride(0), pw.planes.stride(0), pw.stride_wn,
        NBT=pw.nbt, BITS=pw.bits, GPB=pw.group_size // 32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        NB=cfg.nb, GROUP_M=cfg.group_m, SWAP=cfg.swap, HAS_BIAS=pw.bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


DEQUANT_CFG = {"block_n": 32, "nb": 4, "num_warps": 4}


def dequant(pw: PreparedWeight, dtype: torch.dtype, *, out: torch.Tensor | None = None,
            block_n: int | None = None, nb: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The full weight [N, K] in ``dtype`` (fp16/bf16/fp32), one kernel."""
    n, k = pw.out_features, pw.in_features
    block_n = block_n or DEQUANT_CFG["block_n"]
    nb = nb or DEQUANT_CFG["nb"]
    num_warps = num_warps or DEQUANT_CFG["num_warps"]
    if out is None:
        out = torch.empty(n, k, device=pw.planes.device, dtype=dtype)
    grid = (triton_cdiv(n, block_n), triton_cdiv(pw.nbt, nb))
    tk._dequant_kernel[grid](pw.planes, pw.coef, out, n, pw.planes.stride(0), pw.stride_wn,
                             NBT=pw.nbt, BITS=pw.bits, GPB=pw.group_size // 32, BLOCK_N=block_n, NB=nb,
                             num_warps=num_warps)
    return out


def dequant_matmul(x: torch.Tensor, pw: PreparedWeight) -> torch.Tensor:
    """Dequantize to x's dtype, then cuBLAS."""
    w = dequant(pw, x.dtype)
    return torch.nn.functional.linear(x, w, None if pw.bias is None else pw.bias.to(x.dtype))


# Large-M path choice per (bits, N, K): "fused" or "dequant"; default below from the sweep.
LARGE_M_PATH: dict[tuple[int, int, int], str] = {}
LARGE_M_DEFAULT = "dequant"  # measured faster than the fused kernel on H100 (RESULTS.md)


def load_tuned(path: str | os.PathLike) -> None:
    """Merge a tuned_configs.json (benchmarks/kernel_sweep.py) into the config tables."""
    data = json.loads(Path(path).read_text())
    for bits, mb, n, k, cfg in data.get("gemv", []):
        GEMV_TUNED[(bits, mb, n, k)] = GemvConfig(**cfg)
    for bits, n, k, cfg in data.get("gemm", []):
        GEMM_TUNED[(bits, n, k)] = GemmConfig(**cfg)
    for bits, n, k, path in data.get("large_m_path", []):
        LARGE_M_PATH[(bits, n, k)] = path
    DEQUANT_CFG.update(data.get("dequant", {}))
    for mb, n, k, cfg in data.get("dense", []):
        DENSE_TUNED[(mb, n, k)] = DenseGemvConfig(**cfg)


def matmul(x: torch.Tensor, pw: PreparedWeight) -> torch.Tensor:
    """x [..., K] -> [..., N]: the skinny kernel for M <= SKINNY_MAX_M, else the large-M path."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m <= SKINNY_MAX_M:
        y = gemv(x2, pw)
    elif LARGE_M_PATH.get((pw.bits, pw.out_features, pw.in_features), LARGE_M_DEFAULT) == "dequant":
        y = dequant_matmul(x2, pw)
    else:
        y = gemm(x2, pw)
    return y.reshape(*lead, pw.out_features)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DenseGemvConfig:
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1


DENSE_TUNED: dict[tuple[int, int, int], DenseGemvConfig] = {}


def dense_gemv(
    x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None, accumulate: bool = False,
    act: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    dtype: torch.dtype | None = None, cfg: DenseGemvConfig | None = None,
) -> torch.Tensor:
    """fp16/bf16 ``w`` [N, K] twin of :func:`gemv` (natural layout only)."""
    m = x.shape[0]
    n, k = w.shape
    dtype = dtype or w.dtype
    if cfg is None:
        mb = m_bucket(m)
        cfg = DENSE_TUNED.get((mb, n, k))
        if cfg is None:
            cfg = DenseGemvConfig(block_m=mb, block_n=16 if mb == 1 else 64, block_k=512 if mb == 1 else 128)
            progs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
            split = 1
            while accumulate and progs * split < 4 * _num_sms(x.device.index or 0) and k // (split * 2) >= cfg.block_k:
                split *= 2
            cfg = replace(cfg, split_k=split)
    if accumulate:
        target, atomic = out, True
    elif cfg.split_k > 1:
        target, atomic = torch.zeros(m, n, device=x.device, dtype=torch.float32), True
    else:
        out = torch.empty(m, n, device=x.device, dtype=dtype) if out is None else out
        target, atomic = out, False
    grid = (triton_cdiv(n, cfg.block_n), cfg.split_k, triton_cdiv(m, cfg.block_m))
    tk._dense_gemv_kernel[grid](
        x, w, target, norm_weight if norm_weight is not None else w, m, n, x.stride(0), w.stride(0),
        target.stride(0), k, eps, K=k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, ACT=act, NORM=norm_weight is not None, ATOMIC=atomic, DOT=cfg.block_m > 1,
        DOT_DTYPE=_TL_DTYPES[w.dtype], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if target is not out:
        if out is None:
            return target.to(dtype)
        out.copy_(target)
    return out


def _load_default_tuned() -> None:
    # the packaged table (measured on an H100), then an override file, later entries winning
    for path in (Path(__file__).with_name("tuned_configs.json"), os.environ.get("QALORA_TUNED_CONFIGS")):
        if path and Path(path).is_file():
            load_tuned(path)


_load_default_tuned()
