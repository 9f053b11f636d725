"""Plane layout round trips and the prepared-weight bookkeeping (CPU, fast)."""

import pytest
import torch

from qalora.kernels.layout import codes_to_planes, make_coef, planes_to_codes, qweight_to_planes, xperm, xperm_index
from qalora.kernels.prepared import concat_layers, prepare_weight, reference_dequant
from qalora.lowbit import LowBitLinear, dequantize, pack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_planes_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 96), generator=g).to(torch.uint8)
    planes = codes_to_planes(codes, bits)
    assert planes.dtype == torch.int32 and planes.shape == (bits, 7, 3)
    assert torch.equal(planes_to_codes(planes, bits), codes)
    assert torch.equal(qweight_to_planes(pack_codes(codes, bits), bits, 96), planes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_magic_decode_matches_codes(bits):
    """The kernels' decode, v = 1 + q/2^b from mantissa bits, reproduced in torch."""
    codes = torch.arange(32 * 4).remainder(1 << bits).to(torch.uint8).reshape(4, 32)
    w = codes_to_planes(codes, bits)  # [bits, 4, 1]
    tgt = 23 - bits
    mask = ((1 << bits) - 1) << tgt
    for c in range(32):
        if bits == 3 and c >= 30:
            continue
        per = {4: 8, 2: 16, 3: 10}[bits]
        word = w[c // per, :, 0].to(torch.int64) & 0xFFFFFFFF
        src = bits * (c % per)
        t = (word << (tgt - src)) if src < tgt else (word >> (src - tgt))
        v = torch.tensor(((t & mask) | 0x3F800000).to(torch.int32).tolist(), dtype=torch.int32).view(torch.float32)
        assert torch.equal((v - 1) * (1 << bits), codes[:, c].float())


def test_coef_reproduces_dequant():
    g = torch.Generator().manual_seed(0)
    bits, gs = 4, 32
    codes = torch.randint(0, 16, (5, 64), generator=g).to(torch.uint8)
    s = (torch.rand(5, 2, generator=g) * 0.1).half()
    z = torch.rand(5, 2, generator=g) * 15
    coef = make_coef(s, z, bits)  # [2, L, N]
    v = 1 + codes.float() / 16
    w = coef[0].t().repeat_interleave(gs, 1) * v + coef[1].t().repeat_interleave(gs, 1)
    torch.testing.assert_close(w, dequantize(codes, s, z, gs), rtol=0, atol=1e-6)


def test_xperm_index():
    x = torch.randn(2, 3, 128)
    assert torch.equal(xperm(x), x[..., xperm_index(128)])


def test_prepare_row_perm_and_concat():
    g = torch.Generator().manual_seed(1)
    layers = []
    for n in (8, 16):
        lay = LowBitLinear(64, n, 3, 32)
        lay.set_quantized(torch.randint(0, 8, (n, 64), generator=g), torch.rand(n, 2, generator=g) + 0.1,
                          torch.rand(n, 2, generator=g) * 7)
        layers.append(lay)
    cat = concat_layers(layers)
    w = torch.cat([lay.dequantized_weight() for lay in layers])
    torch.testing.assert_close(cat.dequantized_weight(), w, rtol=0, atol=0)
    perm = torch.randperm(24, generator=g)
    pw = prepare_weight(cat.qweight, cat.scales, cat.zeros, 3, 32, 64, row_perm=perm)
    torch.testing.assert_close(reference_dequant(pw), w[perm], rtol=0, atol=0)
    assert pw.planes.shape == (3, 24, 16)  # row stride padded to 16 words
    assert torch.equal(planes_to_codes(pw.planes[:, :, :2].contiguous(), 3), cat.codes()[perm])
