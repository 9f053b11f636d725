"""The stage chain on every model family users tune today (issue #14; README "Model families"), on tiny
random-weight models built in code (``tests/families.py``):

- ``test_chain``: per family, RTN quantize -> tune -> merge -> check -> CPU bench -> perplexity eval,
  from a tiny GGUF of the family written here (transformers' GGUF loader maps all but Mixtral; Mixtral
  from its HF folder), after checking that the GGUF and the HF folder load into the same model;
- ``test_gptq_chain``: GPTQModel 7.6 -> tune -> merge -> check on the layouts that differ from
  LLaMA's: Qwen2 (biases of tens), Phi-3 (fused projections, which GPTQModel splits), Qwen3-MoE (experts);
- fused projections merge exactly like their parts; stacked experts are split exactly or refused;
- every refusal (GGUF files, stacked experts, missing weights, the GPU decoder) names the family and why.

About 105 s of CPU time in all (~2 minutes on 2 idle cores)."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from torch import nn

from conftest import tiny_tokenizer, write_alpaca
from families import save_fp, tiny_model, write_gguf
from qalora.check import check_merge
from qalora.checkpoint import load_lowbit_model, load_tensors
from qalora.config import CheckParams, QuantizeParams, TuneParams
from qalora.merge import merge
from qalora.model_io import (
    DEFAULT_TARGETS,
    UnsupportedModelError,
    defuse_experts,
    find_linear_targets,
    join_split_projections,
    load_base_model,
    stacked_expert_weights,
)
from qalora.quantize import quantize_to_folder
from qalora.quantizers.rtn import quantize_model_rtn
from qalora.tune import tune

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Qwen3-MoE from GGUF: experts 768 wide, the only width transformers' GGUF loader reads (families.py);
# 2 of them, top-1, to keep the chain fast (the GPTQ test runs 4 experts of 128, top-2).
MOE_GGUF = {"expert_width": 768, "experts": 2, "top_k": 1}
# family -> the quantized projections of one decoder layer: {name under the layer: (D_out, D_in) or None}.
LAYOUT = {
    **{f: {**{f"self_attn.{p}": None for p in ATTN}, **{f"mlp.{p}": None for p in MLP}}
       for f in ("llama", "mistral", "qwen2", "gemma2", "gemma3")},
    "phi3": {"self_attn.qkv_proj": (128 + 2 * 64, 128), "self_attn.o_proj": (128, 128),
             "mlp.gate_up_proj": (2 * 256, 128), "mlp.down_proj": (128, 256)},
    "qwen3_moe": {**{f"self_attn.{p}": None for p in ATTN},
                  **{f"mlp.experts.{e}.{p}": None for e in range(4) for p in MLP}},
    "mixtral": {**{f"self_attn.{p}": None for p in ATTN},
                **{f"mlp.experts.{e}.{p}": None for e in range(4) for p in MLP}},
}
FAMILIES = list(LAYOUT)
GPTQ_FAMILIES = ["qwen2", "phi3", "qwen3_moe"]  # biases of tens, fused projections (split by GPTQModel), experts
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "qwen3_moe"]
MOE_FAMILIES = ("qwen3_moe", "mixtral")  # stacked experts, split into per-expert layers when loaded
TIED = {"llama", "qwen2", "gemma2", "gemma3"}
PROMPT = [1, 40, 90, 71, 77, 14, 3, 50, 60, 70, 80, 90, 100, 110, 120, 130]  # 16 byte-token ids


def assert_same_forward(got: torch.Tensor, want: torch.Tensor, family: str) -> None:
    """Bit for bit, except where the loader split stacked experts: the same weights in per-expert
    matmuls of other shapes, which MKL may sum in another order (bit-equal on an AVX-512 Xeon, 2e-7
    relative on an AMD EPYC); a misplaced expert or row would be off by O(1)."""
    if family in MOE_FAMILIES:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def _calibration(folder):
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    path = folder / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": text * 3 + str(i)}) + "\n" for i in range(4)))
    return path


def _chain(tmp_path, source, method="rtn", calibration=None):
    """quantize -> tune -> merge -> check on ``source``; returns (quantized, merged) folders and the report."""
    q, ad, m = tmp_path / "q", tmp_path / "adapter", tmp_path / "merged"
    quantize_to_folder(str(source), q, QuantizeParams(method=method, bits=4, group_size=32, calib_samples=4,
                                                      calib_seq_len=64), calibration=calibration, progress=False)
    tune(q, write_alpaca(tmp_path / "alpaca.json", n=8), ad,
         TuneParams(steps=2, lr=5e-3, warmup_steps=0, save_every=100, micro_batch_size=1), progress=False)
    merge(q, ad, m)
    report = check_merge(q, ad, m, CheckParams(prompts=["Count to 3."], max_new_tokens=3))
    assert report["passed"], (report["failed"], {k: report["checks"][k] for k in report["failed"]})
    return q, m, report


def _assert_fully_quantized(family, folder):
    """Every projection of every layer is low-bit, with the family's shapes; no nn.Linear is left in fp
    but the head, no stacked expert weight anywhere."""
    quant = json.loads((folder / "qalora_quant.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    experts = cfg.get("num_local_experts", cfg.get("num_experts", 4))
    expected = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in LAYOUT[family].items()
                if ".experts." not in name or int(name.split(".")[2]) < experts}
    assert set(quant["layers"]) == set(expected), sorted(set(quant["layers"]) ^ set(expected))
    for name, shape in expected.items():
        spec = quant["layers"][name]
        assert (spec["bits"], spec["group_size"]) == (4, 32)
        if shape is not None:
            assert (spec["out_features"], spec["in_features"]) == shape, name
    model, _, _ = load_lowbit_model(folder, verify=False)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    assert not stacked_expert_weights(model)
    assert ("lm_head.weight" in quant["tied"]) == (family in TIED)
    return quant


# ---------------------------------------------------------------------------------------------
# The chain per family: RTN from the family's GGUF (a HF folder where transformers maps no GGUF),
# then bench and eval smoke
# ---------------------------------------------------------------------------------------------


def _fp_source(family, tmp_path):
    """The family's fp model as a HF folder and, where transformers' GGUF loader maps the family, as a tiny
    GGUF written here; both must load (load_base_model) into the very model. Returns the GGUF, else the folder."""
    kw = MOE_GGUF if family == "qwen3_moe" else {}
    model = tiny_model(family, **kw)
    folder = save_fp(model, tiny_tokenizer(), tmp_path / "fp")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = model(ids).logits
        from_folder, _ = load_base_model(folder)
        assert_same_forward(from_folder(ids).logits, want, family)
    if family not in GGUF_FAMILIES:
        return folder
    gguf = write_gguf(model, tiny_tokenizer(), tmp_path / f"{family}.gguf")
    loaded, tok = load_base_model(gguf)
    # Mistral: llama.cpp writes arch "llama", and transformers builds LlamaForCausalLM (same weights, same math).
    assert type(loaded).__name__ == ("LlamaForCausalLM" if family == "mistral" else type(model).__name__)
    with torch.no_grad():
        assert_same_forward(loaded(ids).logits, want, family)  # the loader rebuilds the very model
    text = "Count to 3."
    if family.startswith("gemma"):  # Gemma files carry a sentencepiece vocab (other ids, same text back)
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    else:
        assert tok(text).input_ids == tiny_tokenizer()(text).input_ids
    return gguf


@pytest.mark.parametrize("family", FAMILIES)
def test_chain(family, tmp_path, state_dir):
    """fp (GGUF or HF folder) -> quantize RTN -> tune -> merge -> check -> bench -> eval (perplexity)."""
    from qalora.bench import run_bench
    from qalora.evaluate import evaluate_path

    source = _fp_source(family, tmp_path)
    assert source.suffix == (".gguf" if family in GGUF_FAMILIES else "")
    q, merged, report = _chain(tmp_path, source)
    _assert_fully_quantized(family, q)
    assert report["checks"]["codes"]["passed"] and report["checks"]["logits"]["max_rel_error"] <= 1e-3
    tensors = load_tensors(merged)
    if family == "qwen2":  # biases of tens survive the chain untouched and the deploy check adds them
        assert tensors["model.layers.0.self_attn.k_proj.bias"].abs().min() >= 20
    if family == "gemma2":
        cfg = json.loads((merged / "config.json").read_text())
        assert cfg["final_logit_softcapping"] == 30.0 and cfg["attn_logit_softcapping"] == 50.0

    bench = run_bench(model=merged, batches=[1, 2], prefills=[8], steps=2, reps=1, device="cpu", log=lambda *a: None)
    assert bench["lowbit"]["decode"]["2"]["tokens_per_s"] > 0 and bench["dense"]["prefill_ms"]["8"] > 0
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    result = evaluate_path(merged, ["wiki_ppl"], device="cpu", data_dir=tmp_path, ppl_text=heldout,
                           ppl_context=32, ppl_max_tokens=256, progress=False)
    ppl = result["tasks"]["wiki_ppl"]["perplexity"]
    assert 1.0 < ppl < 5 * 272, ppl  # a random 272-token model: around its vocab size


# ---------------------------------------------------------------------------------------------
# GPTQ (GPTQModel 7.6) from HF folders, on the families whose layout differs from LLaMA's
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", GPTQ_FAMILIES)
def test_gptq_chain(family, tmp_path, ext_cache, state_dir):
    fp_model = tiny_model(family)
    fp = save_fp(fp_model, tiny_tokenizer(), tmp_path / "fp")
    q, _, _ = _chain(tmp_path, fp, method="gptq", calibration=_calibration(tmp_path))
    _assert_fully_quantized(family, q)
    # Each low-bit layer is GPTQ of the fp layer of the same name: Phi-3's gate_up_proj, which GPTQModel
    # quantizes as gate_proj + up_proj, comes back with its rows in order; the experts under their names.
    defuse_experts(fp_model)
    model, _, _ = load_lowbit_model(q)
    for name, layer in ((n, m) for n, m in model.named_modules() if hasattr(m, "dequantized_weight")):
        w = fp_model.get_submodule(name).weight.detach()
        err = ((layer.dequantized_weight() - w).norm() / w.norm()).item()
        assert err < 0.2, (name, err)  # 4-bit g32 on Gaussian weights: ~0.1; swapped rows would be ~1.4


# ---------------------------------------------------------------------------------------------
# GGUF: what transformers' loader refuses, named
# ---------------------------------------------------------------------------------------------


def test_gguf_refusals_name_the_family_and_the_reason(tmp_path):
    import gguf as gguf_py

    neox = gguf_py.GGUFWriter(str(tmp_path / "neox.gguf"), "gptneox")
    neox.add_name("tiny-neox")
    neox.add_tokenizer_model("gpt2")
    neox.add_token_list(["a", "b", "c"])
    neox.add_token_scores([0.0] * 3)
    neox.add_tensor("token_embd.weight", torch.zeros(3, 32).numpy())
    for step in (neox.write_header_to_file, neox.write_kv_data_to_file, neox.write_tensors_to_file, neox.close):
        step()
    with pytest.raises(UnsupportedModelError, match=r"neox\.gguf: transformers .* \(general\.architecture='gptneox'.*"
                                                    r"does not map architecture 'gptneox' \(it maps .*qwen2.*\)"):
        load_base_model(tmp_path / "neox.gguf")

    # Mixtral: llama.cpp writes it as a "llama" file with experts; transformers would build a dense LLaMA
    # whose MLP weights are missing (random).
    mixtral = write_gguf(tiny_model("mixtral"), tiny_tokenizer(), tmp_path / "mixtral.gguf")
    with pytest.raises(UnsupportedModelError, match=r"general\.architecture='llama'.*: the file is a mixture of experts "
                                                    r"\(llama\.expert_count=4, e\.g\. Mixtral\) that its GGUF loader "
                                                    r"builds as a dense llama model: .*would be random"):
        load_base_model(mixtral)

    # Qwen3-MoE experts of another width than the config default (768): the loader ignores the width.
    moe = write_gguf(tiny_model("qwen3_moe", **{**MOE_GGUF, "expert_width": 128}), tiny_tokenizer(),
                     tmp_path / "moe.gguf")
    with pytest.raises(UnsupportedModelError, match=r"general\.architecture='qwen3moe'.*does not read the experts' "
                                                    r"width \(expert_feed_forward_length=128 here\)"):
        load_base_model(moe)


# ---------------------------------------------------------------------------------------------
# Fused projections: a wider D_out, pooled and merged exactly like the parts
# ---------------------------------------------------------------------------------------------


def test_fused_projection_is_its_parts_stacked():
    """Phi-3's qkv_proj = [q; k; v] rows: the fused layer's RTN codes/scales/zeros and merged zeros are its
    parts' stacked, bit for bit, and its QA-LoRA output (pooling runs along D_in) is theirs to fp32 rounding."""
    from qalora.adapter import QALoRALinear
    from qalora.merge import merge_adapter_into_zeros

    model = tiny_model("phi3")
    fused = model.model.layers[0].self_attn.qkv_proj
    rows = {"q": slice(0, 128), "k": slice(128, 192), "v": slice(192, 256)}
    parts = nn.ModuleDict({k: nn.Linear(128, s.stop - s.start, bias=False) for k, s in rows.items()})
    with torch.no_grad():
        for k, s in rows.items():
            parts[k].weight.copy_(fused.weight[s])
    holder = nn.ModuleDict({"qkv_proj": fused, **{f"{k}_proj": parts[k] for k in rows}})
    quantize_model_rtn(holder, 4, 32, ["qkv_proj", "q_proj", "k_proj", "v_proj"], progress=False)
    torch.manual_seed(0)
    adapters = nn.ModuleDict({n: QALoRALinear(holder[n], rank=4, alpha=8.0) for n in holder})
    with torch.no_grad():
        adapters["qkv_proj"].lora_B.normal_(0, 0.05)
        for k, s in rows.items():  # the parts share A; each gets its rows of B
            adapters[f"{k}_proj"].lora_A.copy_(adapters["qkv_proj"].lora_A)
            adapters[f"{k}_proj"].lora_B.copy_(adapters["qkv_proj"].lora_B[s])
    x = torch.randn(3, 128)
    with torch.no_grad():
        stacked = torch.cat([adapters[f"{k}_proj"](x) for k in rows], dim=-1)
        torch.testing.assert_close(adapters["qkv_proj"](x), stacked, rtol=1e-6, atol=1e-6)
    for buf in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(holder["qkv_proj"], buf),
                           torch.cat([getattr(holder[f"{k}_proj"], buf) for k in rows])), buf
    before = holder["qkv_proj"].zeros.clone()
    merge_adapter_into_zeros(adapters)
    moved = torch.cat([adapters[f"{k}_proj"].zeros for k in rows])
    assert torch.equal(adapters["qkv_proj"].zeros, moved)  # the merge moves each row's zeros on its own
    assert not torch.equal(moved, before)


def test_fused_projection_targets_follow_their_parts():
    model = tiny_model("phi3")
    assert sorted({n.split(".")[-1] for n in find_linear_targets(model, DEFAULT_TARGETS)}) == [
        "down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    # A fused layer is a target when all its parts are (or by its own name), never for some of them.
    assert sorted({n.split(".")[-1] for n in find_linear_targets(model, ["q_proj", "k_proj", "down_proj"])}) == [
        "down_proj"]
    assert sorted({n.split(".")[-1] for n in find_linear_targets(model, ["gate_up_proj"])}) == ["gate_up_proj"]


def test_join_split_projections_stacks_rows_in_order():
    Layer = namedtuple("Layer", "codes scales zeros bias bits group_size")

    def layer(v, rows, bits=4):
        return Layer(torch.full((rows, 8), v), torch.full((rows, 2), v), torch.full((rows, 2), v), None, bits, 4)

    read = {"m.mlp.up_proj": layer(2, 3), "m.mlp.gate_proj": layer(1, 3), "m.mlp.down_proj": layer(5, 2)}
    joined = join_split_projections(read, {"m.mlp.gate_up_proj", "m.mlp.down_proj"})
    assert sorted(joined) == ["m.mlp.down_proj", "m.mlp.gate_up_proj"]
    fused = joined["m.mlp.gate_up_proj"]
    assert fused.codes[:, 0].tolist() == [1, 1, 1, 2, 2, 2] and fused.bias is None and fused.bits == 4
    assert join_split_projections(read, {"m.mlp.gate_proj"}) == read  # asked as parts: left as they are
    with pytest.raises(ValueError, match=r"cannot join .* into m\.mlp\.gate_up_proj: their bits differ"):
        join_split_projections({**read, "m.mlp.up_proj": layer(2, 3, bits=3)}, {"m.mlp.gate_up_proj"})


# ---------------------------------------------------------------------------------------------
# Mixtures of experts: split on load, refused while stacked
# ---------------------------------------------------------------------------------------------


def test_stacked_experts_are_split_exactly_or_refused():
    model = tiny_model("qwen3_moe")
    stacked = stacked_expert_weights(model)
    assert set(stacked) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    # Quantizing only the nn.Linear layers would leave the experts in fp: refused, naming family and cure.
    with pytest.raises(UnsupportedModelError, match=r"qwen3_moe: 4 weights are stacked mixture-of-experts parameters"
                                                    r", not nn.Linear layers \(e\.g\. model\.layers\.0\.mlp\.experts\."
                                                    r"gate_up_proj \[4, 256, 128\]\).*defuse_experts"):
        find_linear_targets(model, DEFAULT_TARGETS)
    ids = torch.tensor([PROMPT])
    weights = {name: model.get_parameter(name).detach().clone() for name in stacked}
    with torch.no_grad():
        before = model(ids).logits
        new = defuse_experts(model)
        assert_same_forward(model(ids).logits, before, "qwen3_moe")
    assert len(new) == 2 * 4 * 3 and "model.layers.1.mlp.experts.3.down_proj" in new
    # the split copies every weight bit for bit: expert e's gate and up are the halves of gate_up_proj[e]
    for i in range(2):
        gate_up, down = (weights[f"model.layers.{i}.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj"))
        half = gate_up.shape[1] // 2
        for e in range(4):
            expert = f"model.layers.{i}.mlp.experts.{e}"
            assert torch.equal(model.get_submodule(f"{expert}.gate_proj").weight, gate_up[e, :half])
            assert torch.equal(model.get_submodule(f"{expert}.up_proj").weight, gate_up[e, half:])
            assert torch.equal(model.get_submodule(f"{expert}.down_proj").weight, down[e])
    assert defuse_experts(model) == []  # idempotent

    other = tiny_model("qwen3_moe")
    other.config.model_type = "my_moe"  # a family the splitter does not know
    with pytest.raises(UnsupportedModelError, match=r"my_moe: 4 weights are stacked .* defuser cannot split this "
                                                    r"family's experts: mixture-of-experts family 'my_moe' is not "
                                                    r"supported"):
        defuse_experts(other)


def test_gpu_decoder_runs_the_llama_layout_only():
    """The static decoder the GPU benchmark times is LLaMA's block: other families are refused by name
    (the CPU benchmark, in test_chain, runs every family through its own transformers model)."""
    from qalora.decoder import model_source

    for family in FAMILIES:
        model = tiny_model(family)
        defuse_experts(model)
        quantize_model_rtn(model, 4, 32, DEFAULT_TARGETS, progress=False)
        if family in ("llama", "mistral"):
            assert len(model_source(model, torch.device("cpu"), torch.float32).qkv) == 2
            continue
        with pytest.raises(UnsupportedModelError, match=rf"^{model.config.model_type}: the static decoder \(the GPU "
                                                        r"benchmark\) runs LLaMA-layout blocks only"):
            model_source(model, torch.device("cpu"), torch.float32)


def test_checkpoint_missing_weights_is_refused_not_random(tmp_path):
    """A HF folder lacking weights of its family would load with those weights random: refused, named."""
    from safetensors.torch import load_file, save_file

    folder = save_fp(tiny_model("qwen2"), tiny_tokenizer(), tmp_path / "fp")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weights of qwen2 are missing from the checkpoint \(e\.g\. "
                                         r"\['model\.layers\.1\.mlp\.up_proj\.weight'\]\).*at random"):
        load_base_model(folder)
