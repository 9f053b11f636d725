"""CUDA kernels against the reference dequant on random inputs (skipped without CUDA/triton)."""

import pytest
import torch

from qalora.kernels import lowbit_linear, prepare_for_inference, triton_available
from qalora.kernels.layout import xperm
from qalora.kernels.prepared import prepare_weight, reference_dequant
from qalora.lowbit import LowBitLinear, pack_codes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _pw(n, k, bits, g, seed, bias=False, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, device=device).to(torch.uint8)
    s = (torch.rand(n, k // g, generator=gen, device=device) * 0.02 + 0.001).half()
    z = torch.rand(n, k // g, generator=gen, device=device) * ((1 << bits) - 1) + 0.3 * torch.randn(
        n, k // g, generator=gen, device=device)
    b = torch.randn(n, generator=gen, device=device) if bias else None
    return prepare_weight(pack_codes(codes, bits), s, z, bits, g, k, bias=b)


def _ref(x, pw):
    w = reference_dequant(pw).double()
    y = x.double() @ w.t()
    return y + pw.bias.double() if pw.bias is not None else y


def _check(y, ref, dtype):
    assert torch.isfinite(y).all()
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], err


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 300])
def test_matmul_all_paths(bits, dtype, m):
    """Every path (FMA M=1, tensor-core skinny, large-M fused and dequant+cuBLAS); the group
    size cycles over 32/64/128 with M to keep compiles few."""
    from qalora.kernels import gpu

    g = {1: 32, 5: 64, 16: 128, 33: 32, 300: 128}[m]

    n, k = 200, 1408  # N not a tile multiple, K/32 = 44 blocks (not a power of two)
    pw = _pw(n, k, bits, g, seed=bits * 1000 + g + m, bias=(m == 5))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = _ref(x, pw)
    _check(gpu.matmul(x, pw), ref, dtype)
    if m > gpu.SKINNY_MAX_M:
        _check(gpu.dequant_matmul(x, pw), ref, dtype)
        _check(gpu.gemm(x, pw, cfg=gpu.GemmConfig(block_m=64, block_n=64, nb=4, swap=True, num_warps=4)), ref, dtype)
    else:
        _check(gpu.gemv(xperm(x), pw, x_perm=True), ref, dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_split_k_accumulate_and_fusions(bits):
    from qalora.kernels import gpu

    n, k = 256, 2048
    pw = _pw(n, k, bits, 128, seed=7)
    for m in (1, 4):
        out = torch.randn(m, n, device="cuda")
        h = torch.randn(m, k, device="cuda")
        for split in (1, 4):
            cfg = gpu.GemvConfig(block_n=32, nb=16, split_k=split, block_m=1 if m == 1 else 16)
            o = out.clone()
            gpu.gemv(h.bfloat16(), pw, out=o, accumulate=True, cfg=cfg)
            _check(o - out, _ref(h.bfloat16(), pw), torch.bfloat16)
            # fused RMSNorm prologue on an fp32 stream (slot-major), bf16 compute
            nw = torch.rand(k, device="cuda") + 0.5
            xn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
            y = gpu.gemv(xperm(h), pw, norm_weight=xperm(nw), x_perm=True, dtype=torch.bfloat16, cfg=cfg)
            _check(y, _ref(xn, pw), torch.bfloat16)
            # fused SiLU(gate) * up prologue
            gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
            act = torch.nn.functional.silu(gu[:, :k].double()) * gu[:, k:].double()
            y = gpu.gemv(gu, pw, act=True, cfg=cfg)
            _check(y, _ref(act, pw), torch.bfloat16)


def test_dequant_kernel_exact():
    from qalora.kernels import gpu

    for bits in (2, 3, 4):
        pw = _pw(96, 512, bits, 64, seed=bits)
        w = gpu.dequant(pw, torch.float32)
        torch.testing.assert_close(w, reference_dequant(pw), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m", [1, 8, 32])
def test_dense_gemv(m):
    from qalora.kernels import gpu

    n, k = 320, 1024
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.double().t()
    _check(gpu.dense_gemv(x, w), ref, torch.bfloat16)
    out = torch.randn(m, n, device="cuda")
    o = out.clone()
    gpu.dense_gemv(x, w, out=o, accumulate=True)
    _check(o - out, ref, torch.bfloat16)


def test_prepared_module_on_cuda():
    lay = LowBitLinear(256, 96, 4, 64)
    gen = torch.Generator().manual_seed(0)
    lay.set_quantized(torch.randint(0, 16, (96, 256), generator=gen), torch.rand(96, 4, generator=gen) * 0.01,
                      torch.rand(96, 4, generator=gen) * 15)
    model = torch.nn.Sequential(lay).cuda()
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    ref = model(x)
    prepare_for_inference(model)
    assert model[0].backend == "triton"
    y = model(x)
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 2e-3
    assert torch.equal(model(x.float()), lowbit_linear(x.float(), model[0].prepared))  # fp32: reference path
