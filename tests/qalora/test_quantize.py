import pytest
import torch

from conftest import TARGETS, tiny_llama
from qalora.lowbit import LowBitLinear
from qalora.quantizers.rtn import quantize_model_rtn, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_one_step(bits):
    # Half a step from rounding, plus at most half a step at the range ends where the rounded
    # integer zero shifts the grid and codes clip.
    w = torch.randn(16, 128)
    codes, scales, zeros = rtn_quantize(w, bits, 32)
    assert int(codes.max()) < 2**bits and zeros.eq(zeros.round()).all()
    deq = scales.float().repeat_interleave(32, 1) * (codes.float() - zeros.repeat_interleave(32, 1))
    step = scales.float().repeat_interleave(32, 1)
    assert ((deq - w).abs() <= step * 1.001).all()
    assert ((deq - w).abs() / step).mean() < 0.35  # uniform rounding error averages 0.25


def test_rtn_more_bits_less_error():
    w = torch.randn(32, 256)
    errs = []
    for bits in (2, 3, 4, 8):
        c, s, z = rtn_quantize(w, bits, 64)
        deq = s.float().repeat_interleave(64, 1) * (c.float() - z.repeat_interleave(64, 1))
        errs.append((deq - w).norm().item())
    assert errs == sorted(errs, reverse=True)


def test_quantize_model_replaces_only_targets():
    model = tiny_llama()
    names = quantize_model_rtn(model, 4, 64, ["q_proj", "down_proj"], progress=False)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), LowBitLinear) for n in names)
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)


def test_group_not_dividing_names_layer():
    model = tiny_llama(intermediate=96)  # down_proj has D_in=96: 64 does not divide it
    with pytest.raises(ValueError, match=r"does not divide D_in=96 of model\.layers\.0\.mlp\.down_proj"):
        quantize_model_rtn(model, 4, 64, TARGETS, progress=False)


def test_unknown_target_lists_linears():
    with pytest.raises(ValueError, match="no module matches target_modules=.*q_proj"):
        quantize_model_rtn(tiny_llama(), 4, 32, ["query"], progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gptq_on_cuda_without_a_gpu_names_the_key_and_writes_nothing(tmp_path, fp_model_dir):
    from qalora.config import QuantizeParams
    from qalora.quantize import quantize_to_folder

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    with pytest.raises(RuntimeError, match="quantize.device=cuda but no CUDA device"):
        quantize_to_folder(str(fp_model_dir), tmp_path / "out", QuantizeParams(device="cuda", group_size=32,
                                                                               calib_samples=2, calib_seq_len=32), calib)
    assert not (tmp_path / "out").exists()
