"""GPTQ through GPTQModel -> canonical format: exactness against GPTQModel's own code.

What "exact" means here (and why it can be asserted bit for bit):

- codes and zeros: the integers our reader produces equal the integers GPTQModel's own layer
  (TorchLinear, loaded by GPTQModel.load from its own checkpoint, after its own v1->v2 zero
  conversion) unpacks - integer-identical;
- scales: the same fp16 values;
- weights: our fp32 dequantization s*(q-z) is the exact real product (an 11-bit fp16 mantissa
  times an integer |q-z| <= 255 fits fp32's 24 bits). GPTQModel's fp16 kernel path computes the
  same product in fp16, i.e. that exact product rounded once to fp16, so ``ours.half()`` must be
  bit-identical to it; with its scales cast to fp32 its dequantization must equal ours bit for bit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qalora.quantizers.gptq import (
    apply_gptq_checkpoint,
    gptqmodel_env,
    quantize_model_gptq,
    read_gptq_checkpoint,
    unpack_gptq_zeros,
)
from qalora.lowbit import LowBitLinear, dequantize
from conftest import TARGETS, tiny_llama, tiny_tokenizer

BITS = (2, 3, 4, 8)


@pytest.fixture(scope="session")
def gptqmodel(request):
    """GPTQModel imported into the test process (as the reference), env set first.

    Its C++ pack extension is cached in pytest's cache dir so only the first session builds it.
    HF_HOME is pinned to the value huggingface_hub already uses, so GPTQModel's tokenizer helper
    does not redirect it for the rest of the session.
    """
    import huggingface_hub.constants as hf_constants

    ext = request.config.cache.mkdir("gptqmodel_torch_extensions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR", os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(ext)))
        os.environ.setdefault("HF_HOME", hf_constants.HF_HOME)
        for key in ("GPTQMODEL_CPU_WORKERS",):
            mp.setenv(key, gptqmodel_env()[key])
        import gptqmodel

        yield gptqmodel


# ---------------------------------------------------------------------------------------------
# Reader on hand-built packed tensors
# ---------------------------------------------------------------------------------------------


def _stream_words(values, bits):
    """Independent packer: values as one little-endian bit stream, cut into uint32 words."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (bits * i)
    return [(acc >> (32 * k)) & 0xFFFFFFFF for k in range(len(values) * bits // 32)]


def _int32(words):
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def _hand_packed(codes, zeros, bits, v1):
    """qweight [D_in*b/32, D_out] and qzeros [L, D_out*b/32] as GPTQModel v1 (or v2) stores them."""
    qweight = _int32([list(r) for r in zip(*[_stream_words(codes[j].tolist(), bits) for j in range(codes.shape[0])])])
    maxq = (1 << bits) - 1
    rows = []
    for k in range(zeros.shape[1]):
        col = zeros[:, k].tolist()
        if v1 and bits == 3:  # field-wise zero-1 mod 8
            rows.append(_stream_words([(z - 1) & maxq for z in col], bits))
        elif v1:  # word-wise (word - 0x..0101) mod 2^32: borrows across fields where a zero is 0
            one = sum(1 << (bits * j) for j in range(32 // bits))
            rows.append([(w - one) & 0xFFFFFFFF for w in _stream_words(col, bits)])
        else:
            rows.append(_stream_words(col, bits))
    return qweight, _int32(rows)


def _truth(bits, d_out=64, d_in=128, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (d_out, d_in), generator=g, dtype=torch.int64)
    zeros = torch.randint(0, maxq + 1, (d_out, d_in // group), generator=g, dtype=torch.int64)
    zeros[0:8] = 0  # the borrow case of v1 at 2/4/8 bit
    zeros[8:16] = maxq
    zeros[20, 1] = 0
    scales = (torch.rand(d_out, d_in // group, generator=g) * 0.02 + 1e-3).to(torch.float16)
    return codes, zeros, scales


def _write_checkpoint(folder, name, qweight, qzeros, scales, g_idx, bits, group, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales.t().contiguous(),
               f"{name}.g_idx": g_idx.to(torch.int32)}, str(folder / "model.safetensors"))
    (folder / "quantize_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": group, "desc_act": False, "sym": False, "quant_method": "gptq",
         "checkpoint_format": fmt, "pack_dtype": "int32"}))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", BITS)
def test_reader_hand_built(tmp_path, bits, fmt, gptqmodel):
    """Known codes/zeros (zeros 0 and max included) packed three ways agree, and read back exactly.

    1. an independent packer in this file (a big-int bit stream + the v1 zero-1 rule);
    2. GPTQModel's own packer (TorchLinear.pack_block) and its own v2->v1 conversion;
    3. our reader recovers the known integers and fp16 scales from the checkpoint.
    """
    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    group, name = 32, "model.layers.0.mlp.down_proj"
    codes, zeros, scales = _truth(bits)
    d_out, d_in = codes.shape
    g_idx = torch.arange(d_in) // group
    v1 = fmt == "gptq"
    qweight, qzeros = _hand_packed(codes, zeros, bits, v1)

    # GPTQModel packs W = s*(q - z) (exact in fp32) back into the same words.
    s32 = scales.float()
    linear = nn.Linear(d_in, d_out, bias=False)
    linear.weight.data = (s32.repeat_interleave(group, 1) * (codes - zeros.repeat_interleave(group, 1))).float()
    ref = TorchLinear(bits=bits, group_size=group, sym=False, desc_act=False, in_features=d_in,
                      out_features=d_out, bias=False, register_buffers=True)
    ref.pack_block(linear, s32, zeros.float(), g_idx.to(torch.int32))
    assert torch.equal(ref.qweight, qweight)
    if v1:
        convert_gptq_v2_to_v1_format_module(ref, QuantizeConfig(bits=bits, group_size=group))
    assert torch.equal(ref.qzeros, qzeros), "the hand-built v1 layout differs from GPTQModel's"

    _write_checkpoint(tmp_path / "ck", name, qweight, qzeros, scales, g_idx, bits, group, fmt)
    (layer,) = read_gptq_checkpoint(tmp_path / "ck").values()
    assert (layer.bits, layer.group_size) == (bits, group)
    assert torch.equal(layer.codes.long(), codes)
    assert torch.equal(layer.zeros, zeros.float())
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias is None

    if v1 and bits != 3:
        # The case this guards: decoding v1 field by field (+1 per field) is wrong next to a 0 zero.
        naive = ((unpack_gptq_zeros(qzeros, bits, d_out, v1=False).long() + 1) % (1 << bits)).t()
        assert not torch.equal(naive, zeros)


def test_reader_rejects_act_order(tmp_path):
    codes, zeros, scales = _truth(4)
    qweight, qzeros = _hand_packed(codes, zeros, 4, True)
    g_idx = (torch.arange(128) // 32)[torch.randperm(128, generator=torch.Generator().manual_seed(1))]
    _write_checkpoint(tmp_path / "ck", "m.q_proj", qweight, qzeros, scales, g_idx, 4, 32, "gptq")
    with pytest.raises(ValueError, match="not contiguous"):
        read_gptq_checkpoint(tmp_path / "ck")


def test_reader_rejects_other_formats(tmp_path):
    codes, zeros, scales = _truth(4)
    qweight, qzeros = _hand_packed(codes, zeros, 4, True)
    _write_checkpoint(tmp_path / "ck", "m.q_proj", qweight, qzeros, scales, torch.arange(128) // 32, 4, 32, "gptq_p")
    with pytest.raises(ValueError, match="checkpoint_format"):
        read_gptq_checkpoint(tmp_path / "ck")


# ---------------------------------------------------------------------------------------------
# quantize_model_gptq: argument checks (no GPTQ run)
# ---------------------------------------------------------------------------------------------


def _calibration(n=8, length=64, vocab=272, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g) for _ in range(n)]


def test_bad_arguments_fail_fast(tmp_path):
    model = tiny_llama()
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="does not divide D_in=128 of model.layers.0.self_attn.q_proj"):
        quantize_model_gptq(model, tok, _calibration(), 4, 48, TARGETS, work_dir=tmp_path)
    with pytest.raises(ValueError, match="not supported by GPTQModel"):
        quantize_model_gptq(model, tok, _calibration(), 4, 8, TARGETS, work_dir=tmp_path)
    with pytest.raises(ValueError, match="bits=5"):
        quantize_model_gptq(model, tok, _calibration(), 5, 32, TARGETS, work_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        quantize_model_gptq(model, tok, [], 4, 32, TARGETS, work_dir=tmp_path)
    with pytest.raises(ValueError, match="outside"):
        quantize_model_gptq(model, tok, [torch.tensor([1, 2, 999])], 4, 32, TARGETS, work_dir=tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        quantize_model_gptq(model, tok, [torch.ones(300, dtype=torch.long)], 4, 32, TARGETS, work_dir=tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not any(tmp_path.iterdir()), "nothing may be written before the arguments are checked"


# ---------------------------------------------------------------------------------------------
# End to end on a tiny LLaMA, checked against GPTQModel's own layers
# ---------------------------------------------------------------------------------------------


def _plant_signed_rows(model):
    """Rows whose groups are all >= 0 (GPTQ zero = 0, v1's borrow case) or all <= 0 (zero = max)."""
    with torch.no_grad():
        for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
            w = lin.weight
            w[0:4] = w[0:4].abs() + 0.05
            w[4:8] = -(w[4:8].abs() + 0.05)


def _gptqmodel_reference(mod):
    """(codes, zeros, fp16 weight, fp32 weight) by GPTQModel's own TorchLinear unpacking, [D_out, ...]."""

    def dq(scales=None, qzeros=None):
        saved = mod.scales, mod.qzeros
        if scales is not None:
            mod.scales = scales
        if qzeros is not None:
            mod.qzeros = qzeros
        try:
            return mod.dequantize_weight().t().contiguous()
        finally:
            mod.scales, mod.qzeros = saved

    w16 = dq()
    w32 = dq(scales=mod.scales.float())
    ones = torch.ones_like(mod.scales, dtype=torch.float32)
    q_minus_z = dq(scales=ones)
    q = dq(scales=ones, qzeros=torch.zeros_like(mod.qzeros))
    z = (q - q_minus_z)[:, :: mod.group_size]
    assert torch.equal((q - q_minus_z), z.repeat_interleave(mod.group_size, 1))
    return q, z, w16, w32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("bits", BITS)
def test_gptq_tiny_llama_matches_gptqmodel(tmp_path, bits, device, gptqmodel, ext_cache, state_dir):
    """GPTQ (on the CPU, or on the GPU with quantize.device=cuda) converts exactly into our layers."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    group = 32
    model = tiny_llama(seed=bits)
    _plant_signed_rows(model)
    x = torch.randint(3, 272, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fp_logits = model(x).logits
    rng = torch.get_rng_state()
    names = quantize_model_gptq(model, tiny_tokenizer(), _calibration(seed=bits), bits, group, TARGETS,
                                device=device, work_dir=tmp_path, progress=False, keep_files=True)
    assert torch.equal(rng, torch.get_rng_state()), "GPTQ must not move this process's torch RNG"
    assert len(names) == 2 * len(TARGETS)
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, LowBitLinear) and (m.bits, m.group_size) == (bits, group)

    (ck,) = tmp_path.glob("gptq-*/gptq_checkpoint")
    gm = GPTQModel.load(str(ck), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    refs = {n: m for n, m in gm.model.named_modules() if isinstance(m, TorchLinear)}
    assert sorted(refs) == sorted(names)
    saw_zero = False
    for n, ref in refs.items():
        ours = model.get_submodule(n)
        q, z, w16, w32 = _gptqmodel_reference(ref)
        assert torch.equal(ours.codes().long(), q.long()), n
        assert torch.equal(ours.zeros, z), n
        assert torch.equal(ours.scales, ref.scales.t()), n
        w = ours.dequantized_weight()
        assert torch.equal(w, w32), n
        assert torch.equal(w.half(), w16), n
        saw_zero |= bool((ours.zeros == 0).any())
    assert saw_zero, "the planted rows should give zero-points of 0 (v1's borrow case)"

    # A user-brought checkpoint converts into the same canonical layers.
    fresh = tiny_llama(seed=bits)
    _plant_signed_rows(fresh)
    assert sorted(apply_gptq_checkpoint(fresh, ck)) == sorted(names)
    for n in names:
        a, b = model.get_submodule(n), fresh.get_submodule(n)
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("qweight", "scales", "zeros")), n

    # The quantized model is still the same model: logits close to the fp model's.
    with torch.no_grad():
        q_logits = model(x).logits
    rel = ((q_logits - fp_logits).norm() / fp_logits.norm()).item()
    assert math.isfinite(rel) and rel < {2: 1.5, 3: 0.6, 4: 0.3, 8: 0.02}[bits], rel


def test_gptq_partial_targets(tmp_path, ext_cache, state_dir):
    """Only the targets are quantized; the other linears stay fp and untouched."""
    model = tiny_llama(seed=3, layers=1)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = quantize_model_gptq(model, tiny_tokenizer(), _calibration(n=4), 4, 64, ("q_proj", "down_proj"),
                                work_dir=tmp_path, progress=False)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    for n, w in before.items():
        m = model.get_submodule(n)
        if n in names:
            assert isinstance(m, LowBitLinear)
            err = (m.dequantized_weight() - w).abs().max() / w.abs().max()
            assert err < 0.2
        else:
            assert isinstance(m, nn.Linear) and torch.equal(m.weight, w), n
    assert not list(tmp_path.glob("gptq-*")), "the work folder is removed after a successful run"


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gptq_smollm2_w4g64_perplexity(tmp_path, ext_cache):
    from qalora.data import calibration_windows, load_texts
    from qalora.model_io import DEFAULT_TARGETS, load_base_model
    from qalora.paths import C4_DEMO, DEFAULT_GGUF, WIKI_DEMO, sources_dir
    from qalora.perplexity import perplexity

    gguf, c4, wiki = (sources_dir() / p for p in (DEFAULT_GGUF, C4_DEMO, WIKI_DEMO))
    missing = [str(p) for p in (gguf, c4, wiki) if not p.is_file()]
    if missing:
        pytest.skip(f"embedded sources not unpacked (run `make sources`): missing {missing}")
    model, tok = load_base_model(gguf)
    text = wiki.read_text(encoding="utf-8")
    fp = perplexity(model, tok, text, context=512, max_tokens=4096, progress=False)["perplexity"]
    calib = calibration_windows(load_texts(c4), tok, 16, 256)
    names = quantize_model_gptq(model, tok, calib, 4, 64, DEFAULT_TARGETS, work_dir=tmp_path, progress=False)
    assert len(names) == 7 * model.config.num_hidden_layers
    q = perplexity(model, tok, text, context=512, max_tokens=4096, progress=False)["perplexity"]
    assert math.isfinite(fp) and 5 < fp < 100, fp
    assert math.isfinite(q) and fp * 0.95 < q < fp * 1.5, (fp, q)
