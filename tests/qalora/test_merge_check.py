"""Merge exactness across bits x group sizes, after real tuning steps (non-zero adapter)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_tiny_base, write_alpaca
from qalora.adapter import QALoRALinear
from qalora.check import check_merge
from qalora.config import CheckParams, TuneParams
from qalora.lowbit import LowBitLinear
from qalora.merge import merge, merge_adapter_into_zeros
from qalora.tune import tune


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_merge_is_exact_after_tuning(tmp_path, bits, group_size):
    base = save_tiny_base(tmp_path / "base", bits=bits, group_size=group_size)
    data = write_alpaca(tmp_path / "a.json")
    tune(base, data, tmp_path / "adapter", TuneParams(steps=3, lr=5e-3, warmup_steps=0, save_every=100), progress=False)
    manifest = merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert manifest["metrics"]["max_abs_zero_shift"] > 0  # the adapter really moved the zeros
    report = check_merge(base, tmp_path / "adapter", tmp_path / "merged", CheckParams(max_new_tokens=6, prompts=["a", "bc"]))
    checks = report["checks"]
    assert report["passed"], report["failed"]
    assert checks["codes"]["layers_with_changed_codes"] == 0 and checks["scales"]["scales_identical"]
    assert checks["scales"]["layers_with_moved_zeros"] == checks["codes"]["layers"] == 14
    assert checks["logits"]["max_rel_error"] <= 1e-3
    assert checks["logits"]["greedy_identical_prompts"] == 2
    assert checks["roundtrip"]["weights_file_identical"]
    assert checks["deploy"]["backends"] == (["int4pack"] if bits == 4 else ["dequant"])  # CPU deploy kernels
    assert checks["deploy"]["dtypes"] == ["bfloat16", "float32"]
    assert checks["deploy"]["by_dtype"]["float32"]["max_error_over_bound"] < 0.1  # exact path: far under


def test_check_fails_when_codes_change(tmp_path):
    from safetensors.torch import save_file

    from qalora.checkpoint import WEIGHTS, load_tensors
    from qalora.manifest import read_json, sha256_tensor, write_json_atomic

    base = save_tiny_base(tmp_path / "base")
    tune(base, write_alpaca(tmp_path / "a.json"), tmp_path / "adapter",
         TuneParams(steps=2, lr=5e-3, warmup_steps=0, save_every=100), progress=False)
    merge(base, tmp_path / "adapter", tmp_path / "merged")
    # Flip one code byte, keeping the manifest consistent, as a wrong merge would.
    t = load_tensors(tmp_path / "merged")
    key = "model.layers.1.mlp.up_proj.qweight"
    t[key][0, 0] ^= 0x01
    save_file(t, str(tmp_path / "merged" / WEIGHTS), metadata={"format": "qalora-lowbit"})
    manifest = read_json(tmp_path / "merged" / "manifest.json")
    manifest["tensors"][key] = sha256_tensor(t[key])
    write_json_atomic(tmp_path / "merged" / "manifest.json", manifest)
    report = check_merge(base, tmp_path / "adapter", tmp_path / "merged", CheckParams(max_new_tokens=2, prompts=["a"]))
    assert not report["passed"] and "codes" in report["failed"]
    assert report["checks"]["codes"]["first_mismatch"] == ["model.layers.1.mlp.up_proj"]


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([8, 16, 32]), rank=st.integers(1, 8),
       alpha=st.floats(0.5, 64), seed=st.integers(0, 2**31))
def test_merged_layer_equals_adapter_path(bits, group, rank, alpha, seed):
    """Property: for random codes/scales/zeros/A/B, merged-layer output == base + QA-LoRA output."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 64, 24
    base = LowBitLinear(d_in, d_out, bits, group)
    base.set_quantized(torch.randint(0, 2**bits, (d_out, d_in), generator=g),
                       torch.rand(d_out, d_in // group, generator=g) * 0.1 + 1e-3,
                       torch.rand(d_out, d_in // group, generator=g) * (2**bits - 1))
    layer = QALoRALinear(base, rank, alpha)
    with torch.no_grad():
        layer.lora_A.normal_(generator=g)
        layer.lora_B.normal_(generator=g)
    x = torch.randn(5, d_in, generator=g)
    expected = layer(x).double()
    model = torch.nn.Sequential(layer)
    merge_adapter_into_zeros(model)
    merged = model[0]
    assert isinstance(merged, LowBitLinear)
    got = merged(x).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
