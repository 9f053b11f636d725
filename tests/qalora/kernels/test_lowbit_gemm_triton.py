"""The fused large-M dequant-GEMM (Triton) against a float64 reference (skipped without CUDA and triton)."""

import pytest
import torch

from qalora.kernels import triton_available
from qalora.kernels.prepared import prepare_weight, reference_dequant
from qalora.lowbit import pack_codes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _pw(n, k, bits, g, seed, bias=False, glu=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, device="cuda").to(torch.uint8)
    s = (torch.rand(n, k // g, generator=gen, device="cuda") * 0.02 + 0.001).half()
    z = torch.rand(n, k // g, generator=gen, device="cuda") * ((1 << bits) - 1)
    b = torch.randn(n, generator=gen, device="cuda") if bias else None
    return prepare_weight(pack_codes(codes, bits), s, z, bits, g, k, bias=b, glu=glu)


def _ref(x, pw):
    y = x.double() @ reference_dequant(pw).double().t()
    if pw.ref_bias is not None:
        y = y + pw.ref_bias.double()
    if pw.glu:
        f = y.shape[-1] // 2
        y = torch.nn.functional.silu(y[..., :f]) * y[..., f:]
    return y


def _err(y, ref):
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_gemm_matches_reference(bits, dtype):
    """N = 200 ends mid-tile, K = 1408 mid-step; groups of one chunk and more; bias; glu; M not a
    multiple of any block; every config the table can pick."""
    from qalora.kernels import gpu_matmul
    from qalora.kernels.lowbit_gemm_triton import GemmConfig, chunk_cols, lowbit_gemm

    k = 1408
    for g, n, bias, glu, m in ((chunk_cols(bits), 200, False, False, 33), (128 if bits == 4 else 256, 200, True, False, 300),
                               (128, 256, False, True, 77), (256, 144, True, True, 40)):
        if g < chunk_cols(bits) or k % g:
            continue
        pw = _pw(n, k, bits, g, seed=bits * 100 + g + m, bias=bias, glu=glu)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = _ref(x, pw)
        assert gpu_matmul.large_m_path(pw, "fused") == "fused"
        y = gpu_matmul.matmul(x, pw, "fused")
        assert y.shape == ((m, n // 2) if glu else (m, n)) and y.dtype == dtype
        assert _err(y, ref) < TOL[dtype], (g, n, bias, glu, m)
        assert torch.equal(gpu_matmul.matmul(x, pw, "fused"), y)  # no atomics, no split-K: the same bits every call
        for cfg in (GemmConfig(64, 8, 4, 2), GemmConfig(128, 16, 8, 4, group_m=1), GemmConfig(64, 8, 8, 2, chunks=2, join=True),
                    GemmConfig(64, 8, 8, 2, chunks=bits, join=False)):
            assert _err(lowbit_gemm(x, pw.tiles, pw.coef, pw.bias, bits, g, n, glu, cfg), ref) < TOL[dtype], cfg


def test_large_m_path_choice(monkeypatch):
    """``auto`` is the measured faster path where the layout allows it: 3-bit, and groups smaller than a
    chunk, keep dequantize + cuBLAS even when the fused GEMM is the default; asking for the fused GEMM on
    them names why it cannot."""
    from qalora.kernels import gpu_matmul

    w3, w2_g64, w4_g64 = _pw(64, 512, 3, 128, seed=1), _pw(64, 512, 2, 64, seed=2), _pw(64, 512, 4, 64, seed=3)
    for auto in ("dequant", "fused"):
        monkeypatch.setattr(gpu_matmul, "LARGE_M_AUTO", auto)
        assert gpu_matmul.large_m_path(w3) == "dequant"
        assert gpu_matmul.large_m_path(w2_g64) == "dequant"  # 2-bit chunks are 128 columns
        assert gpu_matmul.large_m_path(w4_g64) == auto
        assert gpu_matmul.large_m_path(w4_g64, "dequant") == "dequant"
        assert gpu_matmul.large_m_path(w4_g64, "fused") == "fused"
    with pytest.raises(ValueError, match="bits=3, group_size=128"):
        gpu_matmul.large_m_path(w3, "fused")
    with pytest.raises(ValueError, match="auto, fused or dequant"):
        gpu_matmul.large_m_path(w3, "cublas")
