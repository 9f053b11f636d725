"""The canonical low-bit linear layer: packed integer codes, fp16 scales, fp32 float zeros.

A weight W [D_out, D_in] is stored group-wise along the input dimension with group size g and
L = D_in / g contiguous groups (group k covers input columns [k*g, (k+1)*g)):

    W_hat[j, i] = scales[j, k] * (codes[j, i] - zeros[j, k])      k = i // g

- ``qweight`` uint8 [D_out, D_in * bits / 8]: each row is a little-endian bit stream of D_in
  codes of ``bits`` bits (code i occupies bits [i*bits, (i+1)*bits) of the row). The same rule
  covers 2/3/4/8 bit; 3-bit rows pack 8 codes into every 3 bytes.
- ``scales`` fp16 [D_out, L]: GPTQ engines produce fp16 scales; storing them unchanged keeps the
  GPTQ -> canonical conversion exact.
- ``zeros`` fp32 [D_out, L]: float zeros, because the QA-LoRA merge moves them by
  ``(alpha/r) * (B @ A) / s``, which is no integer. fp32 rather than fp16: an fp16 zero near 15
  (4-bit) or 255 (8-bit) has a spacing of 2^-7 or 2^-3 code steps, i.e. a merge error up to 12% of
  a quantization step at 8 bit; fp32 keeps it below 1e-5 of a step, far under the check's 1e-3
  logit bound, for 0.25 extra bits per weight at g=128.

Dequantization is computed in fp32 and then cast to the activation dtype.

The frozen forward (:class:`FrozenLowBitMatmul`) dequantizes per call and keeps nothing: its
backward re-dequantizes to form only the input gradient (the base is frozen), so tuning holds the
base in low bit. On CUDA the per-call dequantization is one Triton kernel over the canonical
buffers (:func:`dequantize_packed`), bit-identical to :func:`dequantize` (same fp32 arithmetic,
one rounding to the output dtype). Whether a layer instead keeps its dequantized weight
(``cache_dequantized``: fast on CPU, where memory is cheap at the sizes tuned there) is decided in
one place, :func:`cache_dequantized_for`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {', '.join(map(str, SUPPORTED_BITS))}")


def check_group(in_features: int, group_size: int, layer: str = "layer") -> None:
    if group_size <= 0 or in_features % group_size != 0:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide D_in={in_features} of {layer}; "
            f"valid group sizes for it include {divisors}"
        )
    if in_features % 8 != 0:
        raise ValueError(f"D_in={in_features} of {layer} must be a multiple of 8 to pack codes")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [R, C] (values in [0, 2^bits)) into uint8 [R, C*bits/8].

    Codes are taken 8 at a time: 8 codes of b bits form one 8b-bit little-endian word, which is
    exactly b bytes. C must be a multiple of 8.
    """
    check_bits(bits)
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} codes per row: need a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # [R, C/8], 8*bits <= 32 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [R, C/8, bits]
    return packed.reshape(rows, cols * bits // 8).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [R, C*bits/8] -> uint8 codes [R, C]."""
    check_bits(bits)
    if bits == 8:
        return packed
    rows, nbytes = packed.shape
    p = packed.to(torch.int64).reshape(rows, nbytes // bits, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1)  # [R, C/8]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C/8, 8]
    return codes.reshape(rows, nbytes * 8 // bits).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes [D_out, D_in] (int), scales/zeros [D_out, L] -> fp32 weight [D_out, D_in]."""
    d_out, d_in = codes.shape
    q = codes.to(torch.float32).reshape(d_out, d_in // group_size, group_size)
    w = scales.to(torch.float32).unsqueeze(-1) * (q - zeros.to(torch.float32).unsqueeze(-1))
    return w.reshape(d_out, d_in)


# --- per-call dequantization (CUDA: one Triton kernel; elsewhere: the reference) -----------------

_TRITON_KERNELS = None  # {"tiled": ..., "element": ...} compiled on first use, or False without triton
# Launch shape of the tiled kernel: rows per program, codes per row per program, warps (within 3%
# of the best of a sweep on an H200 over the LLaMA-7B shapes, benchmarks/tune_throughput.py).
TRITON_TILE = {"block_n": 16, "block_k": 512, "num_warps": 8}
# Relaunch an already compiled kernel directly (a few us of Python) instead of through Triton's JIT
# dispatcher (argument binding, specialization, cache key: ~100 us a call on a slow host CPU, which
# made tuning CPU-bound). Keyed on everything the JIT specializes on; any failure turns it off.
TRITON_FAST_LAUNCH = True
_COMPILED: dict = {}


def _triton_kernels():
    """The Triton kernels (built lazily: importing this module needs neither triton nor a GPU)."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _TRITON_KERNELS = False
            return False

        @triton.jit
        def _dequant_tiled(q_ptr, s_ptr, z_ptr, out_ptr, n_rows, n_cols, row_bytes, n_groups,
                           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           CPW: tl.constexpr, W: tl.constexpr, NG: tl.constexpr):
            """Power-of-two groups. A program takes BLOCK_N rows x BLOCK_K codes: W packed words of
            CPW codes each (a byte for 2/4/8 bit, 3 bytes for 3 bit), loaded whole, split by shifts."""
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            k0 = tl.program_id(1) * BLOCK_K
            rmask = (rows < n_rows)[:, None]
            rows64 = rows.to(tl.int64)[:, None]
            row_ptr = q_ptr + rows64 * row_bytes
            widx = k0 // CPW + tl.arange(0, W)
            if BITS == 3:
                m = rmask & (widx < n_cols // 8)[None, :]
                p = row_ptr + (widx * 3)[None, :]
                word = (tl.load(p, mask=m, other=0).to(tl.int32)
                        | (tl.load(p + 1, mask=m, other=0).to(tl.int32) << 8)
                        | (tl.load(p + 2, mask=m, other=0).to(tl.int32) << 16))
            else:
                m = rmask & (widx < row_bytes)[None, :]
                word = tl.load(row_ptr + widx[None, :], mask=m, other=0).to(tl.int32)
            shifts = tl.arange(0, CPW) * BITS
            codes = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, W, CPW]
            if NG > 0:  # GROUP <= BLOCK_K: NG whole groups per row
                gidx = k0 // GROUP + tl.arange(0, NG)
                gm = rmask & (gidx < n_groups)[None, :]
                goff = rows64 * n_groups + gidx[None, :]
                sc = tl.load(s_ptr + goff, mask=gm, other=1.0).to(tl.float32)
                ze = tl.load(z_ptr + goff, mask=gm, other=0.0).to(tl.float32)
                q = tl.reshape(codes, (BLOCK_N, NG, GROUP)).to(tl.float32)
                w = tl.reshape(sc[:, :, None] * (q - ze[:, :, None]), (BLOCK_N, BLOCK_K))
            else:  # one group spans this whole tile
                goff = rows64 * n_groups + k0 // GROUP
                sc = tl.load(s_ptr + goff, mask=rmask, other=1.0).to(tl.float32)
                ze = tl.load(z_ptr + goff, mask=rmask, other=0.0).to(tl.float32)
                w = sc * (tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.float32) - ze)
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(out_ptr + rows64 * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=rmask & (cols < n_cols)[None, :])

        @triton.jit
        def _dequant_element(q_ptr, s_ptr, z_ptr, out_ptr, n_rows, n_cols, row_bytes, n_groups,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
            """Any group size: each code located on its own (slower)."""
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            byte = (cols * BITS) // 8  # code i occupies bits [i*BITS, (i+1)*BITS) of its row
            shift = (cols * BITS) % 8
            b0 = tl.load(q_ptr + rows64 * row_bytes + byte[None, :], mask=mask, other=0).to(tl.int32)
            if BITS == 3:  # a 3-bit code may straddle two bytes
                m1 = mask & ((byte + 1) < row_bytes)[None, :]
                b1 = tl.load(q_ptr + rows64 * row_bytes + byte[None, :] + 1, mask=m1, other=0).to(tl.int32)
                b0 = b0 | (b1 << 8)
            code = (b0 >> shift[None, :]) & ((1 << BITS) - 1)
            goff = rows64 * n_groups + (cols // GROUP)[None, :]
            s = tl.load(s_ptr + goff, mask=mask, other=1.0).to(tl.float32)
            z = tl.load(z_ptr + goff, mask=mask, other=0.0).to(tl.float32)
            w = s * (code.to(tl.float32) - z)  # = dequantize(): fp32, then one rounding below
            tl.store(out_ptr + rows64 * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

        _TRITON_KERNELS = {"tiled": _dequant_tiled, "element": _dequant_element}
    return _TRITON_KERNELS


def triton_dequant_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and bool(_triton_kernels())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _launch(name: str, grid: tuple[int, int], args: tuple, constexprs: dict, num_warps: int) -> None:
    """Launch Triton kernel ``name``: the first time for a key through the JIT (compiles), then
    straight through the compiled kernel's launcher with the same arguments in signature order."""
    global TRITON_FAST_LAUNCH
    kernel = _triton_kernels()[name]
    if TRITON_FAST_LAUNCH and args[0].is_cuda:
        dev = args[0].get_device()
        key = (name, dev, num_warps, tuple(constexprs.items()),
               tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args))
        compiled = _COMPILED.get(key)
        if compiled is not None:
            try:
                from triton import knobs
                from triton.runtime.driver import driver

                stream = driver.active.get_current_stream(dev)
                full = (*args, *constexprs.values())
                compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata,
                             compiled.launch_metadata(grid, stream, *full), knobs.runtime.launch_enter_hook,
                             knobs.runtime.launch_exit_hook, *full)
                return
            except Exception:  # noqa: BLE001  (another Triton's internals: use its JIT from now on)
                TRITON_FAST_LAUNCH = False
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        try:
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            compiled._init_handles()
            assert compiled.function is not None and compiled.run is not None
            _COMPILED[key] = compiled
        except Exception:  # noqa: BLE001
            TRITON_FAST_LAUNCH = False
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def _triton_dequant(qweight, scales, zeros, bits, group_size, dtype, *, kernel=None, block_n=None, block_k=None,
                    num_warps=None) -> torch.Tensor:
    rows, row_bytes = qweight.shape
    cols = row_bytes * 8 // bits
    out = torch.empty(rows, cols, dtype=dtype, device=qweight.device)
    block_n = block_n or TRITON_TILE["block_n"]
    block_k = block_k or TRITON_TILE["block_k"]
    num_warps = num_warps or TRITON_TILE["num_warps"]
    if kernel is None:
        kernel = "tiled" if _is_pow2(group_size) and group_size >= 8 else "element"
    grid = ((rows + block_n - 1) // block_n, (cols + block_k - 1) // block_k)
    args = (qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, rows, cols, row_bytes,
            cols // group_size)
    constexprs = {"BITS": bits, "GROUP": group_size, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if kernel == "tiled":
        cpw = 8 if bits == 3 else 8 // bits
        constexprs.update(CPW=cpw, W=block_k // cpw, NG=block_k // group_size if group_size <= block_k else 0)
    _launch(kernel, grid, args, constexprs, num_warps)
    return out


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
    dtype: torch.dtype = torch.float32, *, use_triton: bool | None = None,
) -> torch.Tensor:
    """Canonical buffers -> weight [D_out, D_in] in ``dtype``: ``dequantize`` (fp32) rounded once
    to ``dtype``. On CUDA one Triton kernel (reads the packed codes, writes only the output);
    elsewhere, or with ``use_triton=False``, the reference unpack + :func:`dequantize`."""
    if use_triton is None:
        use_triton = triton_dequant_available(qweight.device)
    if not use_triton:
        return dequantize(unpack_codes(qweight, bits), scales, zeros, group_size).to(dtype)
    return _triton_dequant(qweight, scales, zeros, bits, group_size, dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: the autocast dtype when autocast is on for x's device."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class FrozenLowBitMatmul(torch.autograd.Function):
    """y = x W^T (+ bias) for a frozen :class:`LowBitLinear`, W dequantized per call.

    Forward dequantizes W in the compute dtype (autocast's, else x's), multiplies, and drops W.
    Backward re-dequantizes W and returns only dL/dx = dL/dy W: the base is frozen, so there is no
    weight gradient and nothing is saved for backward (not W, not even x), only a reference to the
    layer's packed buffers. Works under autocast (computes as F.linear would: in the autocast
    dtype, output in that dtype) and under gradient checkpointing (its forward is just re-run).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LowBitLinear") -> torch.Tensor:
        dtype = _compute_dtype(x)
        w = layer.weight_as(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        # every operand already in the compute dtype: autocast, if on, casts nothing
        y = F.linear(x if x.dtype == dtype else x.to(dtype), w, bias)
        ctx.layer, ctx.x_dtype, ctx.dtype = layer, x.dtype, dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.weight_as(ctx.dtype)
        grad_x = (grad_y if grad_y.dtype == ctx.dtype else grad_y.to(ctx.dtype)).matmul(w)
        return grad_x if grad_x.dtype == ctx.x_dtype else grad_x.to(ctx.x_dtype), None


def cache_dequantized_for(device: torch.device | str, mode: str = "auto") -> bool:
    """The one place that decides whether a frozen layer keeps its dequantized weight (tune, eval).

    ``"auto"``: yes on CPU (the exact fp32 path; memory is not the limit at the sizes tuned there,
    and re-dequantizing every call costs time), no on any accelerator (a resident full-precision
    copy of the base is what low-bit tuning exists to avoid: layers dequantize per call through
    :class:`FrozenLowBitMatmul`). ``"on"``/``"off"`` force it.
    """
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise ValueError(f"dequant cache mode {mode!r}: valid are auto, on, off")
    return torch.device(device).type == "cpu"


class LowBitLinear(nn.Module):
    """A frozen group-wise quantized linear layer in the canonical format (see module doc).

    Buffers: ``qweight`` uint8 [D_out, D_in*bits/8], ``scales`` fp16 [D_out, L],
    ``zeros`` fp32 [D_out, L], optional ``bias`` [D_out].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        name: str = "layer",
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_group(in_features, group_size, name)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        # Frozen base: the dequantized weight may be cached per dtype while tuning (see ``cache``).
        self._cached: torch.Tensor | None = None
        self.cache_dequantized = False

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """uint8 [D_out, D_in]."""
        return unpack_codes(self.qweight, self.bits)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [D_out, D_in]."""
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype`` (fp32 dequantization rounded once), a fresh tensor
        (one Triton kernel on CUDA)."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Fill from integer codes [D_out, D_in], scales [D_out, L], float zeros [D_out, L]."""
        expected = (self.out_features, self.in_features)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codes shape {tuple(codes.shape)} != {expected}")
        if int(codes.max()) >= (1 << self.bits) or int(codes.min()) < 0:
            raise ValueError(f"codes out of range for {self.bits}-bit")
        self.qweight.copy_(pack_codes(codes, self.bits))
        self.scales.copy_(scales.to(torch.float16))
        self.zeros.copy_(zeros.to(torch.float32))
        self._cached = None

    def invalidate_cache(self) -> None:
        self._cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_dequantized:
            self._cached = None
            return FrozenLowBitMatmul.apply(x, self)
        if self._cached is None or self._cached.dtype != x.dtype:
            self._cached = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._cached, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )
