import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora.lowbit import LowBitLinear, dequantize, pack_codes, unpack_codes


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 6), cols8=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(bits, rows, cols8, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols8 * 8), generator=g, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols8 * bits)
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.uint8))


def test_pack_is_little_endian_bitstream():
    # 3-bit codes 1..8 mod 8 -> bits laid out LSB first across bytes
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    word = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    expected = [(word >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(codes, 3)[0].tolist() == expected


def test_dequantize_formula():
    codes = torch.tensor([[0, 3, 1, 2]])
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    zeros = torch.tensor([[1.5, -1.0]])
    w = dequantize(codes, scales, zeros, group_size=2)
    assert torch.equal(w, torch.tensor([[-0.75, 0.75, 4.0, 6.0]]))


@pytest.mark.parametrize("bits", [5, 1, 16])
def test_bad_bits_named(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is not supported; valid: 2, 3, 4, 8"):
        LowBitLinear(64, 8, bits, 32)


def test_bad_group_names_layer():
    with pytest.raises(ValueError, match="group_size=48 does not divide D_in=64 of model.layers.0.q_proj"):
        LowBitLinear(64, 8, 4, 48, name="model.layers.0.q_proj")


def test_forward_matches_dequantized_matmul():
    layer = LowBitLinear(64, 16, 3, 32, bias=True)
    g = torch.Generator().manual_seed(0)
    layer.set_quantized(torch.randint(0, 8, (16, 64), generator=g), torch.rand(16, 2, generator=g) + 0.1,
                        torch.rand(16, 2, generator=g) * 7)
    layer.bias.normal_()
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + layer.bias, rtol=0, atol=0)


def test_set_quantized_rejects_out_of_range_codes():
    layer = LowBitLinear(64, 4, 2, 32)
    with pytest.raises(ValueError, match="out of range for 2-bit"):
        layer.set_quantized(torch.full((4, 64), 4), torch.ones(4, 2), torch.zeros(4, 2))
