"""Exports that keep the merge: GGUF Q4_1 (checked by gguf-py's reader and transformers' GGUF loader,
llama.cpp when installed) and HQQ (checked by hqq's own loader), on tiny LLaMAs with merged-like
(non-integer) zeros."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qalora.checkpoint import load_lowbit_model, lowbit_layers, save_lowbit_model
from qalora.export import ExportError, check_exportable, export_model
from qalora.export import gguf as gguf_export
from qalora.lowbit import dequantize
from conftest import bpe_tokenizer, save_tiny_base

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?"]


def merged_like(tmp_path, bits=4, group_size=32, seed=0, **kw):
    """A tiny base whose zeros a merge has moved off the integers (what the export must keep)."""
    base = save_tiny_base(tmp_path / f"base{bits}g{group_size}", bits=bits, group_size=group_size, seed=seed, **kw)
    model, _, _ = load_lowbit_model(base)
    tok = bpe_tokenizer()
    g = torch.Generator().manual_seed(seed + 1)
    for layer in lowbit_layers(model).values():
        layer.zeros.add_(torch.randn(layer.zeros.shape, generator=g) * 0.7)
    out = tmp_path / f"merged{bits}g{group_size}"
    save_lowbit_model(model, tok, out, method="rtn+qalora-merge", stage="merge", params={}, inputs={})
    return out


def fp16_m_bound(zeros: torch.Tensor) -> float:
    """Max error of Q4_1's fp16 m = -s*z, in steps: half an fp16 ulp of |s z| over s <= |z| 2^-11."""
    return zeros.abs().max().item() * 2.0 ** -11 + 1e-6


# --- Q4_1 blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_q4_1_blocks_match_gguf_reference_dequantize(group_size):
    import gguf

    g = torch.Generator().manual_seed(0)
    rows, cols = 6, 256
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    scales = (torch.rand(rows, cols // group_size, generator=g) * 0.02 + 1e-3).to(torch.float16)
    zeros = torch.rand(rows, cols // group_size, generator=g) * 15 + torch.randn(rows, cols // group_size, generator=g)
    blocks = gguf_export.pack_q4_1(codes, scales, zeros, group_size)
    assert blocks.shape == (rows, cols // 32 * 20) and blocks.dtype == np.uint8
    # layout: fp16 d, fp16 m, byte j = q[j] | q[j+16] << 4
    first = blocks[0, :20]
    assert first[:2].view(np.float16)[0] == scales[0, 0].item()
    assert first[4] == codes[0, 0].item() | (codes[0, 16].item() << 4)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)  # gguf-py's own Q4_1 reader
    ours = dequantize(codes, scales, zeros, group_size)
    steps = (torch.from_numpy(ref) - ours).abs() / scales.float().repeat_interleave(group_size, 1)
    assert steps.max().item() <= fp16_m_bound(zeros)


def test_llama_permutation_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    perm = gguf_export.llama_permute_rows(64, 4)
    back = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})._reverse_permute_weights(
        w[perm].numpy(), 8, 4)
    assert np.array_equal(back, w.numpy())


# --- GGUF export ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64])
def test_gguf_export_roundtrip_through_gguf_reader_and_transformers(tmp_path, group_size):
    import gguf

    merged = merged_like(tmp_path, group_size=group_size)
    report = export_model(merged, "gguf", tmp_path / "gguf", prompts=PROMPTS, max_new_tokens=8,
                          consumers=("transformers",))
    model, _, _ = load_lowbit_model(merged)
    zmax = max(layer.zeros.abs().max().item() for layer in lowbit_layers(model).values())
    # the weights gguf-py reads back are ours up to the fp16 rounding of m = -s*z
    assert report["passed"] and report["weights"]["tensors_compared"] == 20
    assert 0 < report["weights"]["max_error_steps"] <= zmax * 2.0 ** -11 + 1e-6
    assert report["weights"]["max_abs_error_dense"] == 0.0  # F32 embeddings and norms
    hf = report["consumers"]["transformers"]
    assert hf["tokenizer_identical"]
    assert hf["greedy_identical_prompts"] == len(PROMPTS) and hf["greedy_prefix_agreement"] == 1.0
    assert hf["max_rel_error"] < 2e-3
    assert set(report["consumers"]) == {"transformers"}

    path = tmp_path / "gguf" / "model.gguf"
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert sum(v == "Q4_1" for v in types.values()) == 14
    assert types["token_embd.weight"] == "F32" and "output.weight" not in types  # tied head
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    saved = json.loads((tmp_path / "gguf" / "export.json").read_text())
    assert saved["weights"] == report["weights"]
    assert json.loads((tmp_path / "gguf" / "manifest.json").read_text())["stage"] == "export"


def test_gguf_holds_3bit_codes_exactly_in_q4_1(tmp_path):
    merged = merged_like(tmp_path, bits=3)
    storage = check_exportable(merged, "gguf")
    assert storage["code_bits"] == [3] and storage["container_bits"] == 4 and "3-bit" in storage["note"]
    model, tok, quant = load_lowbit_model(merged)
    gguf_export.write_gguf(model, tok, quant, tmp_path / "m.gguf")
    err = gguf_export.weight_error(model, tmp_path / "m.gguf")
    zmax = max(layer.zeros.abs().max().item() for layer in lowbit_layers(model).values())
    assert err["max_error_steps"] <= zmax * 2.0 ** -11 + 1e-6


def test_gguf_f16_dense_tensors(tmp_path):
    merged = merged_like(tmp_path)
    model, tok, quant = load_lowbit_model(merged)
    written = gguf_export.write_gguf(model, tok, quant, tmp_path / "m.gguf", dense_type="f16")
    err = gguf_export.weight_error(model, tmp_path / "m.gguf")
    emb = model.model.embed_tokens.weight
    assert written["dense_type"] == "f16"
    assert 0 < err["max_abs_error_dense"] <= emb.abs().max().item() * 2.0 ** -11


@pytest.mark.parametrize("case, limit", [
    ("group16", "group size must be a multiple of 32"),
    ("bits8", "at most 4 bits"),
    ("mistral", "model_type='mistral'"),
])
def test_gguf_refuses_what_q4_1_cannot_hold(tmp_path, case, limit):
    if case == "group16":
        folder = save_tiny_base(tmp_path / "b", group_size=16)
    elif case == "bits8":
        folder = save_tiny_base(tmp_path / "b", bits=8)
    else:
        folder = save_tiny_base(tmp_path / "b")
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=limit):
        export_model(folder, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ExportError, match="valid are gguf, hqq"):
        check_exportable(tmp_path, "awq")


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    merged = merged_like(tmp_path)
    report = export_model(merged, "gguf", tmp_path / "gguf", prompts=PROMPTS, max_new_tokens=8,
                          consumers=("llama.cpp",))
    cpp = report["consumers"]["llama.cpp"]
    assert cpp["tokenizer_identical"]
    # llama.cpp multiplies Q4_1 weights with 8-bit quantized activations (Q8_1): its own error on top
    assert cpp["max_rel_error"] < 5e-2
    assert cpp["greedy_identical_prompts"] == len(PROMPTS)


# --- HQQ export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_hqq_packing_matches_hqq_unpack(bits):
    pytest.importorskip("hqq")
    from hqq.core.quantize import Quantizer

    from qalora.export.hqq import PACKING, pack_hqq

    g = torch.Generator().manual_seed(bits)
    groups = torch.randint(0, 2 ** bits, (40, 32), generator=g, dtype=torch.uint8)
    unpacked = Quantizer.unpack[PACKING[bits]](pack_hqq(groups, bits), dtype=torch.uint8)
    assert torch.equal(unpacked[: len(groups)], groups)


@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_export_is_bit_exact_at_fp32(tmp_path, bits):
    pytest.importorskip("hqq")
    merged = merged_like(tmp_path, bits=bits, group_size=64)
    report = export_model(merged, "hqq", tmp_path / "hqq", prompts=PROMPTS, max_new_tokens=8,
                          hqq_compute_dtypes=("float32",))
    c = report["consumers"]["hqq-float32"]
    assert report["passed"] and report["weights"]["max_error_steps"] == 0.0
    assert c["max_rel_error"] == 0.0 and c["greedy_identical_prompts"] == len(PROMPTS)
    assert (tmp_path / "hqq" / "qmodel.pt").is_file() and (tmp_path / "hqq" / "tokenizer.json").is_file()


def test_hqq_refuses_odd_group_count_for_4bit():
    from types import SimpleNamespace

    from qalora.export.hqq import HQQExportError, check_hqq

    quant = {"layers": {"x.q_proj": {"bits": 4, "group_size": 32, "in_features": 32, "out_features": 3, "bias": False}}}
    with pytest.raises(HQQExportError, match="3 groups"):
        check_hqq(SimpleNamespace(), quant)


def test_gguf_refuses_a_bpe_tokenizer_without_merges(tmp_path):
    folder = save_tiny_base(tmp_path / "b")  # conftest's byte tokenizer: no merges
    with pytest.raises(ExportError, match="no merges"):
        export_model(folder, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    from qalora_pipeline.cli import main

    merged = merged_like(tmp_path)
    assert main(["export", "--model", str(merged), "--format", "gguf", "--out", str(tmp_path / "g"),
                 "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["file"] == "model.gguf" and out["weight_max_error_steps"] < 0.03
    assert out["consumers"]["transformers"]["greedy_identical_prompts"] == 4
    folder16 = save_tiny_base(tmp_path / "b16", group_size=16)
    assert main(["export", "--model", str(folder16), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "multiple of 32" in capsys.readouterr().err
