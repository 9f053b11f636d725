"""Tile layout round trips and the prepared-weight bookkeeping (CPU, fast)."""

import pytest
import torch

from qalora.kernels.layout import glu_row_perm, make_coef, pack_tiles, unpack_tiles
from qalora.kernels.prepared import concat_layers, prepare_weight, reference_dequant
from qalora.lowbit import LowBitLinear, dequantize, pack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(16, 256), (7, 96), (40, 1408)])
def test_tiles_round_trip(bits, n, k):
    g = torch.Generator().manual_seed(bits * n)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    tiles = pack_tiles(codes, bits)
    assert tiles.dtype == torch.int32 and tiles.shape == (-(-n // 16), -(-k // 256), bits, 32, 4)
    assert torch.equal(unpack_tiles(tiles, bits, n, k), codes)


def _word_pair(words, p, bits):
    """The kernel's extraction of pair p (lowbit_cuda.cu ``pair``) from one lane's words."""
    if bits == 4:
        w, sh, m = words[p // 4], 4 * (p % 4), 15
    elif bits == 2:
        w, sh, m = words[p // 8], 2 * (p % 8), 3
    elif p < 60:
        w, sh, m = words[p // 5], 3 * (p % 5), 7
    else:
        j = p - 60
        lo = sum(((words[3 * j + b] >> 15) & 1) << b for b in range(3))
        hi = sum(((words[3 * j + b] >> 31) & 1) << b for b in range(3))
        return lo, hi
    return (w >> sh) & m, (w >> (16 + sh)) & m


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_positions_match_mma_fragments(bits):
    """Pair p = 8 sp + 4 f + i of lane 4g + t is row g + 8 (i & 1), column
    32 sp + 8 t + 4 f + 2 (i >> 1) + h, checked element by element for one tile/step."""
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 1 << bits, (16, 256), generator=g).to(torch.uint8)
    tiles = pack_tiles(codes, bits)[0, 0]  # [bits, 32, 4]
    for lane in (0, 5, 18, 31):
        words = [int(v) & 0xFFFFFFFF for v in tiles[:, lane].reshape(-1)]  # uint4 j holds words 4j..4j+3
        gg, t = lane // 4, lane % 4
        for p in range(64):
            sp, f, i = p // 8, (p // 4) % 2, p % 4
            row = gg + 8 * (i & 1)
            col = 32 * sp + 8 * t + 4 * f + 2 * (i >> 1)
            assert _word_pair(words, p, bits) == (int(codes[row, col]), int(codes[row, col + 1]))


def test_coef_reproduces_dequant():
    g = torch.Generator().manual_seed(0)
    n, k, gs = 21, 384, 64
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    s = (torch.rand(n, k // gs, generator=g) * 0.1).half()
    z = torch.rand(n, k // gs, generator=g) * 15
    coef = make_coef(s, z, gs, k)  # [T, Lp, 8, 4]
    assert coef.shape == (2, 8, 8, 4)  # K padded to 512 -> 8 groups of 64
    rows = coef.permute(0, 3, 2, 1).reshape(2, 2, 2, 8, 8)  # [T, r, (s, c), g, Lp]
    sc = rows.permute(0, 1, 3, 2, 4).reshape(32, 2, 8)[:n, :, : k // gs]  # [N, (s, c), L]
    w = sc[:, 0].repeat_interleave(gs, 1) * codes.float() + sc[:, 1].repeat_interleave(gs, 1)
    torch.testing.assert_close(w, dequantize(codes, s, z, gs), rtol=0, atol=2e-6)
    assert torch.all(coef.reshape(2, 8, 8, 4)[1, :, 5:] == 0)  # padding rows (N=21..31) are zero


def test_glu_row_perm():
    p = glu_row_perm(16)
    assert p.tolist()[:16] == list(range(8)) + list(range(16, 24))
    assert sorted(p.tolist()) == list(range(32))
    with pytest.raises(ValueError):
        glu_row_perm(12)


def test_prepare_concat_glu_and_fallback():
    g = torch.Generator().manual_seed(1)
    layers = []
    for n in (8, 24):
        lay = LowBitLinear(64, n, 3, 32, bias=True)
        lay.set_quantized(torch.randint(0, 8, (n, 64), generator=g), torch.rand(n, 2, generator=g) + 0.1,
                          torch.rand(n, 2, generator=g) * 7)
        lay.bias.copy_(torch.randn(n, generator=g))
        layers.append(lay)
    cat = concat_layers(layers)
    w = torch.cat([lay.dequantized_weight() for lay in layers])
    torch.testing.assert_close(cat.dequantized_weight(), w, rtol=0, atol=0)
    pw = prepare_weight(cat.qweight, cat.scales, cat.zeros, 3, 32, 64, bias=cat.bias, glu=True)
    torch.testing.assert_close(reference_dequant(pw), w, rtol=0, atol=0)  # canonical order kept
    perm = glu_row_perm(16)
    assert torch.equal(unpack_tiles(pw.tiles, 3, 32, 64), cat.codes()[perm])
    assert torch.equal(pw.bias, cat.bias[perm]) and torch.equal(pw.ref_bias, cat.bias)
    assert pw.nbytes() == pw.tiles.numel() * 4 + pw.coef.numel() * 4 + 32 * 4
    pw.drop_canonical()
    assert pw.qweight is None and pw.tiles is not None
    # no tile layout (group not a power of two): the dequant fallback keeps the canonical buffers
    lay = LowBitLinear(96, 8, 4, 96)
    pw = prepare_weight(lay.qweight, lay.scales, lay.zeros, 4, 96, 96)
    assert pw.tiles is None and pw.qweight is not None
    codes = torch.randint(0, 16, (8, 96), generator=g).to(torch.uint8)
    lay.set_quantized(codes, torch.ones(8, 1), torch.zeros(8, 1))
    assert torch.equal(lay.qweight, pack_codes(codes, 4))
