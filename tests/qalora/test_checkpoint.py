import pytest
import torch

from conftest import save_tiny_base
from qalora.checkpoint import WEIGHTS, load_lowbit_model, load_tensors, save_lowbit_model
from qalora.manifest import read_json, sha256_file, sha256_tensor


def test_save_reload_byte_identical(tmp_path):
    base = save_tiny_base(tmp_path / "base", bits=3, group_size=32)
    model, tok, quant = load_lowbit_model(base)
    save_lowbit_model(model, tok, tmp_path / "again", method=quant["method"], stage="quantize", params={}, inputs={})
    assert sha256_file(base / WEIGHTS) == sha256_file(tmp_path / "again" / WEIGHTS)
    a, b = load_tensors(base), load_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(sha256_tensor(a[k]) == sha256_tensor(b[k]) for k in a)


def test_reloaded_model_generates_same_tokens(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    m1, tok, _ = load_lowbit_model(base)
    m2, _, _ = load_lowbit_model(base)
    ids = tok("hello", return_tensors="pt").input_ids
    out1 = m1.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out1.shape[1] == ids.shape[1] + 5
    assert torch.equal(out1, m2.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
    assert m1.lm_head.weight is m1.model.embed_tokens.weight  # tied weights restored


def test_manifest_records_every_tensor(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    manifest = read_json(base / "manifest.json")
    assert set(manifest["tensors"]) == set(load_tensors(base))
    assert manifest["outputs"][WEIGHTS] == sha256_file(base / WEIGHTS)


def test_missing_safetensors_is_named(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    (base / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_lowbit_model(base)


def test_corrupt_safetensors_is_named(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = (base / WEIGHTS).read_bytes()
    (base / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lowbit_model(base)


def test_tampered_tensor_fails_manifest(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    from safetensors.torch import save_file

    t = load_tensors(base)
    t["model.layers.0.self_attn.q_proj.zeros"] += 1
    save_file(t, str(base / WEIGHTS))
    with pytest.raises(ValueError, match="does not match manifest.json"):
        load_lowbit_model(base)


def test_failed_save_leaves_no_folder(tmp_path):
    from conftest import tiny_llama

    with pytest.raises(ValueError, match="no LowBitLinear"):
        save_lowbit_model(tiny_llama(), None, tmp_path / "out", method="rtn", stage="q", params={}, inputs={})
    assert list(tmp_path.iterdir()) == []


def test_unquantized_tensors_of_a_bf16_source_are_stored_in_bf16_exactly(tmp_path):
    """Embeddings and norms whose values bf16 holds are stored in bf16 (half the bytes), load back
    bit-identical in fp32, and survive the check's save -> reload round trip; others stay fp32."""
    from safetensors import safe_open

    from conftest import TARGETS, tiny_llama, tiny_tokenizer
    from qalora.checkpoint import load_lowbit_model, save_lowbit_model, storage_state_dict
    from qalora.quantizers.rtn import quantize_model_rtn

    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.to(torch.bfloat16).float())
        model.model.layers[0].input_layernorm.weight.copy_(torch.randn(128).half().float())  # fp16-exact only
        model.model.layers[1].input_layernorm.weight.copy_(torch.randn(128))  # fp32 values
    emb = model.model.embed_tokens.weight.detach().clone()
    quantize_model_rtn(model, 4, 32, TARGETS, progress=False)
    manifest = save_lowbit_model(model, tiny_tokenizer(), tmp_path / "m", method="rtn", stage="quantize",
                                 params={}, inputs={})
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F16"
    assert dtypes["model.layers.0.self_attn.q_proj.zeros"] == "F32"  # canonical buffers untouched
    assert dtypes["model.layers.1.input_layernorm.weight"] == "F32"  # no 16-bit type holds it
    assert manifest["storage"]["float32_kept"] >= 1
    back, _, _ = load_lowbit_model(tmp_path / "m")
    assert back.model.embed_tokens.weight.dtype == torch.float32 and torch.equal(back.model.embed_tokens.weight, emb)
    again, _, _ = storage_state_dict(back)
    assert {k: sha256_tensor(v) for k, v in again.items()} == manifest["tensors"]
