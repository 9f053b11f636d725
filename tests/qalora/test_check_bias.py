"""The check on models whose linear layers carry a bias (Qwen2's q/k/v_proj; k_proj biases of tens),
and check prompts the tokenizer cannot encode."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from conftest import TARGETS, tiny_llama_config, tiny_tokenizer, write_alpaca
from qalora.check import _check_deploy, _check_logits, check_merge
from qalora.checkpoint import WEIGHTS, load_lowbit_model, load_tensors, save_lowbit_model
from qalora.config import CheckParams, TuneParams
from qalora.merge import merge
from qalora.quantizers.rtn import quantize_model_rtn
from qalora.tune import tune

K_BIAS = "model.layers.0.self_attn.k_proj.bias"


def save_biased_base(folder, bits: int = 4, group_size: int = 32, seed: int = 0):
    """A tiny LLaMA with attention biases (q/k/v/o_proj), k_proj biases of tens like Qwen2's, RTN-quantized."""
    torch.manual_seed(seed)
    config = tiny_llama_config()
    config.attention_bias = True
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            k = attn.k_proj.bias
            k.copy_((torch.rand_like(k) * 40 + 20) * torch.sign(torch.randn_like(k)))  # |b| in [20, 60]
            for proj in (attn.q_proj, attn.v_proj, attn.o_proj):
                proj.bias.normal_(0, 2.0)
    quantize_model_rtn(model, bits, group_size, TARGETS, progress=False)
    save_lowbit_model(model, tiny_tokenizer(), folder, method="rtn", stage="quantize", params={}, inputs={})
    return folder


def make_merged(tmp_path, bits: int = 4):
    """(base, adapter, merged) folders: a biased base, 2 tuning steps, merged."""
    base = save_biased_base(tmp_path / "base", bits=bits)
    tune(base, write_alpaca(tmp_path / "a.json"), tmp_path / "adapter",
         TuneParams(steps=2, lr=5e-3, warmup_steps=0, save_every=100), progress=False)
    merge(base, tmp_path / "adapter", tmp_path / "merged")
    return base, tmp_path / "adapter", tmp_path / "merged"


@pytest.fixture(params=[3, 4], ids=["3bit-dequant", "4bit-int4pack"])
def merged_biased(request, tmp_path):
    """Both CPU deploy backends: dequant (3-bit) and int4pack (4-bit, bf16)."""
    return make_merged(tmp_path, request.param)


def test_check_passes_with_large_biases(merged_biased):
    base, adapter, merged = merged_biased
    assert load_tensors(merged)[K_BIAS].abs().min() >= 20  # the biases the deploy reference must add
    report = check_merge(base, adapter, merged, CheckParams(max_new_tokens=4, prompts=["a", "bc"]))
    assert report["passed"], report["failed"]
    deploy = report["checks"]["deploy"]
    assert deploy["dtypes"] == ["bfloat16", "float32"]
    # fp32 is the exact dense matmul: its error is mostly the output's own rounding, u |y| (a bias
    # of tens dominates |y|), half the bound's eps |y| term at worst; 0.07 here, 0.004 without biases
    assert deploy["by_dtype"]["float32"]["max_error_over_bound"] < 0.25


def _rewrite_tensor(folder, key: str, value: torch.Tensor) -> None:
    """Replace one tensor of a low-bit folder, keeping its manifest consistent (as a wrong merge would)."""
    from safetensors.torch import save_file

    from qalora.manifest import read_json, sha256_tensor, write_json_atomic

    t = load_tensors(folder)
    t[key] = value
    save_file(t, str(folder / WEIGHTS), metadata={"format": "qalora-lowbit"})
    manifest = read_json(folder / "manifest.json")
    manifest["tensors"][key] = sha256_tensor(value)
    write_json_atomic(folder / "manifest.json", manifest)


def test_check_fails_on_wrong_bias_in_merged(tmp_path):
    base, adapter, merged = make_merged(tmp_path)
    bias = load_tensors(merged)[K_BIAS]
    _rewrite_tensor(merged, K_BIAS, bias + 0.5 * torch.sign(bias))
    report = check_merge(base, adapter, merged, CheckParams(max_new_tokens=4, prompts=["a", "bc"]))
    assert not report["passed"]
    assert "scales" in report["failed"] and K_BIAS in report["checks"]["scales"]["other_tensors_changed"]


def test_deploy_check_fails_when_deploy_path_drops_bias(tmp_path, monkeypatch):
    """Comparing like with like must still catch a deploy kernel that forgets the bias."""
    from qalora.kernels import PreparedLowBitLinear

    model, _, _ = load_lowbit_model(save_biased_base(tmp_path / "base"))
    assert _check_deploy(model)["passed"]
    monkeypatch.setattr(PreparedLowBitLinear, "forward",
                        lambda self, x: F.linear(x, self.dequantized_weight().to(x.dtype)))
    report = _check_deploy(model)
    assert not report["passed"] and report["max_error_over_bound"] > 1


def _empty_vocab_tokenizer():
    """A BPE tokenizer with special tokens only and no unk token: it drops every character it sees."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2}, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def test_prompt_with_zero_tokens_is_a_clear_error(tmp_path):
    model, _, _ = load_lowbit_model(save_biased_base(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"check prompt 'Hi there' tokenizes to zero tokens with the tokenizer \w+"):
        _check_logits(model, model, _empty_vocab_tokenizer(), CheckParams(prompts=["Hi there"]))


def test_check_merge_names_the_prompt_and_tokenizer(tmp_path):
    base, adapter, merged = make_merged(tmp_path)
    _empty_vocab_tokenizer().save_pretrained(base)  # tokenizer files are not tensors: the base still loads
    with pytest.raises(ValueError, match=r"'Hi there' tokenizes to zero tokens with the tokenizer \w+ \(.*base\)"):
        check_merge(base, adapter, merged, CheckParams(prompts=["Hi there"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_on_cuda_passes_with_large_biases(tmp_path):
    """check.device=cuda: both models and the deploy paths on the GPU, the same five checks passing."""
    base, adapter, merged = make_merged(tmp_path, 4)
    report = check_merge(base, adapter, merged, CheckParams(device="cuda", max_new_tokens=4, prompts=["a", "bc"]))
    assert report["device"] == "cuda" and report["passed"], report["failed"]
    assert set(report["checks"]["deploy"]["backends"]) <= {"cuda", "dequant"}
