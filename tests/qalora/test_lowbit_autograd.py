"""The frozen low-bit forward (FrozenLowBitMatmul): same outputs and input gradients as the dense
path, no dequantized weight kept, works with autocast and gradient checkpointing; and the one
place that decides caching."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TARGETS, save_tiny_base, tiny_llama, write_alpaca
from qalora import lowbit
from qalora.adapter import apply_qalora
from qalora.config import TuneParams
from qalora.lowbit import LowBitLinear, cache_dequantized_for, dequantize_packed
from qalora.manifest import read_json
from qalora.quantizers.rtn import quantize_model_rtn
from qalora.tune import resolve_dtype, tune


def random_layer(d_in=256, d_out=48, bits=4, group=64, bias=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    layer = LowBitLinear(d_in, d_out, bits, group, bias=bias)
    groups = d_in // group
    layer.set_quantized(torch.randint(0, 1 << bits, (d_out, d_in), generator=g),
                        torch.rand(d_out, groups, generator=g) * 0.05 + 0.01,
                        torch.rand(d_out, groups, generator=g) * ((1 << bits) - 1))
    if bias:
        layer.bias.copy_(torch.randn(d_out, generator=g))
    return layer.to(device)


def dense(layer: LowBitLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: F.linear over the fp32 dequantized weight (what the cached path runs)."""
    w = layer.dequantized_weight()
    return F.linear(x, w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_same_output_and_input_grad_as_dense_fp32(bits, bias):
    layer = random_layer(bits=bits, bias=bias, seed=bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 256, generator=g)
    grad_y = torch.randn(3, 5, 48, generator=g)

    x1 = x.clone().requires_grad_(True)
    y1 = layer(x1)  # cache off: the autograd Function
    (y1 * grad_y).sum().backward()
    x2 = x.clone().requires_grad_(True)
    y2 = dense(layer, x2)
    (y2 * grad_y).sum().backward()

    assert y1.grad_fn is not None and "FrozenLowBitMatmul" in type(y1.grad_fn).__name__
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert layer._cached is None


def test_no_dequantized_weight_kept_when_cache_off():
    layer = random_layer(d_in=256, d_out=40, group=32)
    torch.manual_seed(0)
    wrapped = apply_qalora(torch.nn.ModuleDict({"q_proj": layer}), 4, 8.0, 0.1, ["q_proj"])["q_proj"]
    with torch.no_grad():
        wrapped.lora_B.normal_()
    x = torch.randn(2, 7, 256, requires_grad=True)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = wrapped(x)
    y.square().sum().backward()
    # nothing of the weight's size was saved for backward (not W, not a cast of it) ...
    assert saved and not any(t.numel() == 40 * 256 for t in saved)
    # ... and nothing stays on the module after the step: only the packed buffers and the adapter.
    assert layer._cached is None
    tensors = {n for n, v in vars(layer).items() if isinstance(v, torch.Tensor)}
    assert tensors == set()
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "scales", "zeros"}
    assert x.grad is not None and wrapped.lora_A.grad is not None and wrapped.lora_B.grad is not None

    layer.cache_dequantized = True  # the other mode keeps it
    wrapped(x).sum().backward()
    assert layer._cached is not None and layer._cached.shape == (40, 256)


def test_autocast_bf16_matches_dense_autocast():
    layer = random_layer(bits=3, bias=True)
    x = torch.randn(4, 256, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        y2 = dense(layer, x2)  # autocast casts the fp32 weight to bf16 inside F.linear
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.float().sum().backward()
    y2.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-2)


def test_gradient_checkpointing_same_adapter_grads():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(0)
        quantize_model_rtn(model, 4, 32, TARGETS, progress=False)
        torch.manual_seed(0)
        layers = apply_qalora(model, 4, 8.0, 0.0, TARGETS)
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(3, 272, (2, 24), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(not layer.base.cache_dequantized and layer.base._cached is None for layer in layers.values())
        grads.append(torch.cat([p.grad.flatten() for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_cache_decided_in_one_place():
    assert cache_dequantized_for("cpu") is True
    assert cache_dequantized_for("cuda") is False
    assert cache_dequantized_for("cuda", "on") is True and cache_dequantized_for("cpu", "off") is False
    with pytest.raises(ValueError, match="valid are auto, on, off"):
        cache_dequantized_for("cpu", "sometimes")
    assert resolve_dtype(TuneParams(), torch.device("cpu")) == "fp32"
    assert resolve_dtype(TuneParams(), torch.device("cuda")) == "bf16"
    assert resolve_dtype(TuneParams(dtype="fp32"), torch.device("cuda")) == "fp32"


@pytest.mark.parametrize("cache, expected", [("auto", True), ("off", False)])
def test_tune_records_compute_and_both_modes_agree(tmp_path, cache, expected):
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json")
    m = tune(base, data, tmp_path / "ad", TuneParams(steps=2, dequant_cache=cache, device="cpu"), progress=False)
    assert m["compute"] == {"device": "cpu", "dtype": "fp32", "dequant_cache": expected}
    assert read_json(tmp_path / "ad" / "manifest.json")["compute"]["dequant_cache"] is expected


def test_cpu_dequant_is_the_reference():
    layer = random_layer(bits=3)
    for dtype in (torch.float32, torch.bfloat16):
        w = dequantize_packed(layer.qweight, layer.scales, layer.zeros, 3, 64, dtype)
        assert torch.equal(w, layer.dequantized_weight().to(dtype))
    assert not lowbit.triton_dequant_available("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_triton_dequant_bit_identical_and_grads(bits):
    if not lowbit.triton_dequant_available("cuda"):
        pytest.skip("triton not importable")
    for group, d_in, d_out in ((32, 256, 48), (128, 4096, 1000)):
        layer = random_layer(d_in=d_in, d_out=d_out, bits=bits, group=group, device="cuda", seed=bits)
        ref = layer.dequantized_weight()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for _ in range(2):  # compiled through the JIT, then relaunched directly
                w = dequantize_packed(layer.qweight, layer.scales, layer.zeros, bits, group, dtype)
                assert w.is_cuda and torch.equal(w, ref.to(dtype)), (group, dtype)
    assert lowbit.TRITON_FAST_LAUNCH and lowbit._COMPILED
    x = torch.randn(2, 33, d_in, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y1, y2 = layer(x), dense(layer, x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.float().square().sum().backward()
    y2.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
