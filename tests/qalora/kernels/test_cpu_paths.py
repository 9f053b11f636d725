"""CPU paths: torch's int4pack CPU kernel against the reference dequant, its error bound, the
dispatcher and prepare_for_inference (CPU, fast)."""

import pytest
import torch

from qalora.kernels import PreparedLowBitLinear, lowbit_linear, prepare_for_inference, prepare_layer, select_backend
from qalora.kernels.cpu import int4_error_bound, int4_linear, int4pack_available
from qalora.lowbit import LowBitLinear

needs_int4 = pytest.mark.skipif(not int4pack_available(), reason="torch lacks _weight_int4pack_mm_for_cpu")


def _layer(bits, n=64, k=256, g=64, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    lay = LowBitLinear(k, n, bits, g, bias=bias)
    # float zeros as a QA-LoRA merge leaves them
    lay.set_quantized(torch.randint(0, 1 << bits, (n, k), generator=gen),
                      torch.rand(n, k // g, generator=gen) * 0.02 + 0.001,
                      torch.rand(n, k // g, generator=gen) * ((1 << bits) - 1) + torch.randn(n, k // g, generator=gen))
    if bias:
        lay.bias.copy_(torch.randn(n, generator=gen))
    return lay


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_int4
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4pack_fp32_matches_reference(g):
    lay = _layer(4, g=g, bias=True)
    x = torch.randn(5, 256)
    pw = prepare_layer(lay, cpu_int4=True)
    y = int4_linear(x, *pw.cpu_int4, g, pw.bias)
    ref = x.double() @ lay.dequantized_weight().double().t() + lay.bias.double()
    assert _rel(y, ref) < 1e-6  # fp32 scale/zero: fp32 rounding only


@needs_int4
def test_int4pack_bf16_error_within_bound():
    """bf16 operands round zp = s(8 - z) and s: measured error stays under the analytic bound;
    with fp32 operands the kernel is exact to fp32 rounding."""
    lay = _layer(4, n=128, k=512, g=128, seed=3)
    pw = prepare_layer(lay, cpu_int4=True)
    eye = torch.eye(512)
    w_fast = int4_linear(eye.bfloat16(), *pw.cpu_int4, 128, exact=False).float().t()  # [N, K] as computed
    w_ref = lay.dequantized_weight()
    bound = int4_error_bound(lay.scales, lay.zeros, torch.bfloat16)
    out_round = w_ref.abs().max().item() * 2.0**-8  # the bf16 output cast itself
    assert (w_fast - w_ref).abs().max().item() <= bound + out_round
    w_exact = int4_linear(eye, *pw.cpu_int4, 128).t()
    assert (w_exact - w_ref).abs().max().item() < 1e-6


@needs_int4
def test_int4pack_backend_paths_by_dtype(monkeypatch):
    """fp32 activations: the weight dequantized once, bit-identical to LowBitLinear's own forward,
    never torch's (slow) fp32 int4pack kernel; bf16: the int4pack kernel in bf16."""
    import qalora.kernels as kernels

    lay = _layer(4, n=96, k=256, g=64, seed=5, bias=True)
    fast = PreparedLowBitLinear.from_layer(lay)
    assert fast.backend == "int4pack"
    calls = []
    real = kernels.int4_linear
    monkeypatch.setattr(kernels, "int4_linear", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    x = torch.randn(7, 256)
    assert torch.equal(fast(x), lay(x)) and calls == []
    assert fast.prepared.dense is not None  # kept for the next call
    y = fast(x.bfloat16())
    assert y.dtype == torch.bfloat16 and calls == [torch.bfloat16]
    assert _rel(y, lay(x)) < 1e-2  # bf16 rounding of x, scale/zero and the output


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dispatch_cpu(bits):
    lay = _layer(bits, g=64)
    x = torch.randn(3, 256)
    be = select_backend("cpu", bits, 64, 256)
    assert be == ("int4pack" if bits == 4 and int4pack_available() else "dequant")
    ref = lay(x)
    y = lowbit_linear(x, prepare_layer(lay, cpu_int4=True))
    assert _rel(y, ref) < 1e-5
    assert _rel(lowbit_linear(x, lay), ref) < 1e-5


def test_prepare_for_inference_keeps_state_dict():
    model = torch.nn.Sequential(_layer(4, g=64), torch.nn.ReLU(), _layer(3, n=256, k=64, g=32, seed=1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 256)
    ref = model(x)
    prepare_for_inference(model)
    assert all(isinstance(m, PreparedLowBitLinear) for m in (model[0], model[2]))
    assert isinstance(model[0], LowBitLinear)
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert _rel(model(x), ref) < 1e-5
    prepare_for_inference(model)  # idempotent
    with pytest.raises(ValueError, match="unknown backend"):
        PreparedLowBitLinear.from_layer(_layer(4), "nope")


def test_kernels_import_without_triton_side_effects():
    import sys

    import qalora.kernels  # noqa: F401

    assert "qalora.kernels.gpu_matmul" not in sys.modules or torch.cuda.is_available()


def test_gemm_block_shapes_match_the_cuda_table():
    """gpu_matmul.GEMM_CONFIGS (what the planner and the tests index) is lowbit_gemm.cu's QLB_GEMM_CONFIGS: the same
    block shapes, copy forms (WS) included, under the same indices."""
    import re

    from qalora.kernels import cuda_ext, gpu_matmul

    text = cuda_ext.GEMM_SOURCE.read_text()
    table = text[text.index("#define QLB_GEMM_CONFIGS(X)"):]
    table = table[:table.index("#endif")]
    rows = {int(r[0]): tuple(int(v) for v in r[1:])
            for r in (re.split(r",\s*", m) for m in re.findall(r"X\(([\d,\s]+)\)", table))}
    assert rows == gpu_matmul.GEMM_CONFIGS
    assert all(ws in (0, 1, 2) for *_, ws in rows.values())


def test_x_slab_order_moves_each_column_where_the_wgmma_gemm_reads_it():
    """Column 32 sp + 8 t + 4 f + 2 h + j of x lands at 32 sp + 16 f + 8 h + 2 t + j (the wgmma GEMM's
    k slot of that column in slab (sp, f)); columns past K up to whole 256-column steps are zeros."""
    from qalora.kernels.gpu_matmul import x_slab_order

    x = torch.randn(3, 320, dtype=torch.bfloat16)
    xs = x_slab_order(x, 2)
    assert xs.shape == (3, 512)
    for c in range(320):
        sp, w = divmod(c, 32)
        t, f, h, j = w // 8, (w // 4) % 2, (w // 2) % 2, w % 2
        assert torch.equal(xs[:, 32 * sp + 16 * f + 8 * h + 2 * t + j], x[:, c]), c
    assert not xs[:, 320:].any()


def test_x_image_puts_each_row_where_the_bulk_copy_lands_it():
    """x's image for the bulk GEMM: row r of atom a, 16-byte chunk c ^ (r % 8) (the 128-byte swizzle) holds
    slab-order columns 64 a + 8 c .. + 7; rows up to a multiple of 8 and columns up to whole steps are zeros."""
    from qalora.kernels.gpu_matmul import x_image_reference, x_slab_order

    x = torch.randn(13, 320, dtype=torch.bfloat16)
    img = x_image_reference(x, 2)
    xs = x_slab_order(x, 2)
    assert img.shape == (8, 16, 64)
    for a in range(8):
        for r in range(16):
            for c in range(8):
                got = img[a, r, 8 * (c ^ (r % 8)): 8 * (c ^ (r % 8)) + 8]
                want = xs[r, 64 * a + 8 * c: 64 * a + 8 * c + 8] if r < 13 else torch.zeros(8, dtype=x.dtype)
                assert torch.equal(got, want), (a, r, c)


def test_large_m_path_names_why_wgmma_cannot_run_here(monkeypatch):
    """The wgmma GEMM is Hopper code: off a Hopper GPU ``auto`` keeps dequantize + matmul (also for few rows,
    where a Hopper GPU may take the GEMM) and asking for it says what it needs."""
    from lowbit_ref import random_prepared

    from qalora.kernels import gpu_matmul

    pw = random_prepared(64, 512, 4, 128, seed=0, device="cpu")
    assert gpu_matmul.wgmma_auto_max_m(torch.device("cpu")) == 0
    assert gpu_matmul.large_m_path(pw) == "dequant"
    # by GPU where measured (H100), GLU weights only on GPUs not measured (the H200 among them)
    cuda = torch.device("cuda", 0)
    for name, rows in (("NVIDIA H100 80GB HBM3", 1024), ("NVIDIA H200", 0), ("NVIDIA A100-SXM4-80GB", 0)):
        monkeypatch.setattr(gpu_matmul, "_gpu_name", lambda device, name=name: name)
        assert gpu_matmul.wgmma_auto_max_m(cuda) == rows, name
    monkeypatch.setattr(gpu_matmul, "WGMMA_AUTO_MAX_M", 4096)
    assert gpu_matmul.wgmma_auto_max_m(torch.device("cpu")) == 4096
    assert gpu_matmul.large_m_path(pw, m=512) == "dequant"
    with pytest.raises(ValueError, match="Hopper"):
        gpu_matmul.large_m_path(pw, "wgmma")
    with pytest.raises(ValueError, match="auto, wgmma, fused or dequant"):
        gpu_matmul.large_m_path(pw, "cutlass")


def test_gpu_matmul_refuses_bad_arguments_before_any_kernel():
    """The GPU entry points check their arguments first and name what is valid (no GPU needed)."""
    from lowbit_ref import random_prepared

    from qalora.kernels import gpu_matmul

    pw = random_prepared(64, 512, 4, 128, seed=0, device="cpu")  # 4 tiles, 2 steps
    x = torch.randn(16, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no block shape 99: valid are"):
        gpu_matmul.wgmma_gemm(x, pw, 99)
    with pytest.raises(ValueError, match=r"splits=3: 1\.\.2"):
        gpu_matmul.wgmma_gemm(x, pw, 4, splits=3)
    with pytest.raises(ValueError, match="block shape 0 has 256"):
        gpu_matmul.wgmma_gemm(x, pw, 0, splits=2)
    with pytest.raises(ValueError, match="accumulate=True needs an fp32 out"):
        gpu_matmul.wgmma_gemm(x, pw, 4, accumulate=True)
    with pytest.raises(ValueError, match=r"out must be torch.bfloat16 \(16, 64\)"):
        gpu_matmul.gemv(x, pw, out=torch.empty(16, 63, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="accumulate=True needs an fp32 out"):
        gpu_matmul.gemv(x, pw, out=torch.empty(16, 64, dtype=torch.bfloat16), accumulate=True)
    # a weight of few tiles stays on the skinny GEMV at any batch; few rows on any weight
    assert gpu_matmul.decode_gemm_plan(32, pw) is None
    assert gpu_matmul.decode_gemm_plan(gpu_matmul.WGMMA_MIN_M - 1, pw) is None
