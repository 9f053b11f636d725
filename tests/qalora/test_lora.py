"""Plain LoRA over a float base (the sweep's reference methods): NF4 base, tune, exact merge into fp weights."""

import json

import pytest
import torch

from conftest import TARGETS, tiny_llama
from qalora.config import TuneParams
from qalora.lora import apply_lora, merge_lora, nf4_roundtrip, tune_lora
from qalora.model_io import load_base_model

PARAMS = TuneParams(steps=6, lr=1e-2, warmup_steps=0, micro_batch_size=4, max_seq_len=256, save_every=100, dropout=0.0)


def test_nf4_roundtrip_is_four_bit_per_block_and_close():
    w = tiny_llama().model.layers[0].mlp.down_proj.weight.detach()  # [128, 256]
    r = nf4_roundtrip(w)
    assert r.shape == w.shape and r.dtype == w.dtype
    blocks = r.flatten().unflatten(0, (-1, 64))
    assert max(len(torch.unique(b)) for b in blocks) <= 16  # one absmax scale x 16 NF4 levels per block of 64
    rel = ((r - w).norm() / w.norm()).item()
    assert 0.01 < rel < 0.15, rel  # quantized (not a copy), yet close


@pytest.mark.parametrize("base", ["fp", "nf4"])
def test_tune_then_merge_gives_the_tuned_models_logits(tmp_path, fp_model_dir, alpaca_file, base):
    adapter = tmp_path / "adapter"
    manifest = tune_lora(fp_model_dir, alpaca_file, adapter, PARAMS, base, progress=False)
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["pooling"] == "none" and config["lora_base"] == base
    assert manifest["metrics"]["trainable_params"] == sum(
        16 * (layer["num_groups"] + layer["out_features"]) for layer in config["layers"].values())

    merged = tmp_path / "merged"
    merge_lora(fp_model_dir, adapter, merged)
    ids = torch.tensor([[1, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        got = load_base_model(merged)[0](ids).logits
        source = load_base_model(fp_model_dir)[0]
        plain = source(ids).logits
        # The merge is into the source's weights (QLoRA -> GPTQ merges into the 16-bit model), so the
        # reference is the *fp* model with the adapter, whatever base it was tuned over.
        from safetensors.torch import load_file

        layers = apply_lora(source, config["rank"], config["alpha"], 0.0, TARGETS)
        tensors = load_file(str(adapter / "adapter.safetensors"))
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        want = source(ids).logits
    assert (got - want).norm() / want.norm() < 1e-5
    assert (got - plain).norm() / plain.norm() > 1e-4  # the adapter changed the model


def test_nf4_and_fp_bases_tune_different_adapters(tmp_path, fp_model_dir, alpaca_file):
    for base in ("fp", "nf4"):
        tune_lora(fp_model_dir, alpaca_file, tmp_path / f"lora-{base}", PARAMS.model_copy(update={"steps": 2}), base,
                  progress=False)
    adapters = [(tmp_path / f"lora-{b}" / "adapter.safetensors").read_bytes() for b in ("fp", "nf4")]
    assert adapters[0] != adapters[1]


def test_merge_refuses_a_qalora_adapter(tmp_path, fp_model_dir, alpaca_file):
    from conftest import save_tiny_base
    from qalora.tune import tune

    base = save_tiny_base(tmp_path / "base")
    tune(base, alpaca_file, tmp_path / "qa", PARAMS.model_copy(update={"steps": 1}), progress=False)
    with pytest.raises(ValueError, match="'sum'-pooled \\(QA-LoRA\\) adapter"):
        merge_lora(fp_model_dir, tmp_path / "qa", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_lora_refuses_a_quantized_model(tmp_path):
    from conftest import save_tiny_base
    from qalora.checkpoint import load_lowbit_model

    model, _, _ = load_lowbit_model(save_tiny_base(tmp_path / "base"))
    with pytest.raises(TypeError, match="not a float nn.Linear"):
        apply_lora(model, 4, 4.0, 0.0, TARGETS)


def test_merge_refuses_an_adapter_tuned_on_another_model(tmp_path, fp_model_dir, alpaca_file):
    from conftest import tiny_tokenizer

    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    tune_lora(fp_model_dir, alpaca_file, tmp_path / "ad", PARAMS.model_copy(update={"steps": 1}), "nf4", progress=False)
    with pytest.raises(ValueError, match="was tuned on base"):
        merge_lora(other, tmp_path / "ad", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
