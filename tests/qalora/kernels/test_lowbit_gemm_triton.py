"""The fused large-M dequant-GEMM (Triton) against a float64 reference (skipped without CUDA and triton)."""

import pytest
import torch
from lowbit_ref import TOL, random_prepared, reference, rel_err

from qalora.kernels import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")]


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
        pw = random_prepared(n, k, bits, g, seed=bits * 100 + g + m, bias=bias, glu=glu)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = reference(x, pw)
        assert gpu_matmul.large_m_path(pw, "fused") == "fused"
        y = gpu_matmul.matmul(x, pw, "fused")
        assert y.shape == ((m, n // 2) if glu else (m, n)) and y.dtype == dtype
        assert rel_err(y, ref) < TOL[dtype], (g, n, bias, glu, m)
        assert torch.equal(gpu_matmul.matmul(x, pw, "fused"), y)  # no atomics, no split-K: the same bits every call
        for cfg in (GemmConfig(64, 8, 4, 2), GemmConfig(128, 16, 8, 4, group_m=1), GemmConfig(64, 8, 8, 2, chunks=2, join=True),
                    GemmConfig(64, 8, 8, 2, chunks=bits, join=False)):
            assert rel_err(lowbit_gemm(x, pw.tiles, pw.coef, pw.bias, bits, g, n, glu, cfg), ref) < TOL[dtype], cfg


def test_large_m_path_choice(monkeypatch):
    """``auto`` is the measured faster path where the layout allows it: 3-bit, and groups smaller than a
    chunk, keep dequantize + cuBLAS even when the fused GEMM is the default; asking for the fused GEMM on
    them names why it cannot."""
    from qalora.kernels import gpu_matmul

    w3, w2_g64, w4_g64 = random_prepared(64, 512, 3, 128, seed=1), random_prepared(64, 512, 2, 64, seed=2), random_prepared(64, 512, 4, 64, seed=3)
    for auto in ("dequant", "fused"):
        monkeypatch.setattr(gpu_matmul, "LARGE_M_AUTO", auto)
        assert gpu_matmul.large_m_path(w3) == "dequant"
        assert gpu_matmul.large_m_path(w2_g64) == "dequant"  # 2-bit chunks are 128 columns
        assert gpu_matmul.large_m_path(w4_g64) == auto
        assert gpu_matmul.large_m_path(w4_g64, "dequant") == "dequant"
        assert gpu_matmul.large_m_path(w4_g64, "fused") == "fused"
    with pytest.raises(ValueError, match="bits=3, group_size=128"):
        gpu_matmul.large_m_path(w3, "fused")
    with pytest.raises(ValueError, match="auto, wgmma, fused or dequant"):
        gpu_matmul.large_m_path(w3, "cublas")
