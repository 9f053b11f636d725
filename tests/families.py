"""Tiny random-weight models of every family qalora is tested on, built in code, and a tiny GGUF writer.

Each builder returns an fp32 model in eval mode with hidden 128, intermediate 256, 2 layers and the
272-token vocab of the byte tokenizer (``conftest.tiny_tokenizer``): every projection's D_in is a
multiple of 128, so groups of 32/64/128 divide it and GPTQModel's multiple-of-32 rule holds.
Each family keeps the trait that could break the chain:

- llama: the baseline (tied embeddings);
- mistral: untied head, sliding-window attention;
- qwen2: q/k/v biases, k_proj biases of tens (as in real Qwen2 checkpoints), tied embeddings;
- gemma2: sqrt(hidden)-scaled embeddings, (1 + w) RMSNorms incl. pre/post-feedforward norms,
  attention and final-logit soft-capping, alternating sliding/full attention, tied head;
- gemma3: gemma3_text (Gemma3ForCausalLM): q/k norms, scaled embeddings, sliding-window layers, tied head;
- phi3: fused ``qkv_proj`` [(H + 2 H_kv) d, D] and ``gate_up_proj`` [2 F, D], untied head;
- qwen3_moe, mixtral (mixtures of experts): transformers 5 stores the experts stacked as 3-D
  parameters, not nn.Linear layers; qalora splits them into per-expert layers on load
  (``qalora.model_io.defuse_experts``).

``write_gguf`` writes a model as an F32 GGUF the way llama.cpp's converter lays it out (tensor names
from gguf-py's map, LLaMA's q/k row permutation, Gemma's norm + 1), with the byte tokenizer as a
GGUF "gpt2" byte-level BPE vocab (Gemma files: a byte-fallback sentencepiece vocab, as real ones carry),
so transformers' GGUF loader has a real file to read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from conftest import tiny_llama_config

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 128, 256, 2, 272
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _perturb_norms(model: PreTrainedModel, std: float = 0.1) -> None:
    """Random norm weights (transformers inits them to 1, or 0 for Gemma's 1 + w): a wrong norm
    convention (e.g. in a GGUF round trip) then shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * std)


def llama() -> PreTrainedModel:
    return LlamaForCausalLM(tiny_llama_config())


def mistral() -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=32, tie_word_embeddings=False))


def qwen2() -> PreTrainedModel:
    model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            k = attn.k_proj.bias
            k.copy_((torch.rand_like(k) * 40 + 20) * torch.sign(torch.randn_like(k)))  # |b| in [20, 60]
            attn.q_proj.bias.normal_(0, 2.0)
            attn.v_proj.bias.normal_(0, 2.0)
    return model


def gemma2() -> PreTrainedModel:
    # query_pre_attn_scalar and the soft-caps keep Gemma2Config's defaults (256, 50, 30): a GGUF file
    # does not carry them, so the GGUF round trip rebuilds the same model.
    cfg = Gemma2Config(**COMMON, head_dim=32, sliding_window=32, tie_word_embeddings=True,
                       layer_types=["sliding_attention", "full_attention"])
    assert cfg.attn_logit_softcapping and cfg.final_logit_softcapping
    return Gemma2ForCausalLM(cfg)


def gemma3() -> PreTrainedModel:
    # layer_types keeps Gemma 3's default 5:1 sliding:full pattern (both layers sliding here): a GGUF file
    # does not carry the pattern, so the GGUF round trip rebuilds the same model. Gemma 2 covers the
    # alternating sliding/full attention.
    cfg = Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=32, tie_word_embeddings=True)
    return Gemma3ForCausalLM(cfg)


def phi3() -> PreTrainedModel:
    return Phi3ForCausalLM(Phi3Config(**COMMON, tie_word_embeddings=False))


def qwen3_moe(expert_width: int = 128, experts: int = 4, top_k: int = 2) -> PreTrainedModel:
    """``experts`` experts of width ``expert_width``, ``top_k`` per token. A GGUF round trip needs
    ``expert_width=768`` (Qwen3MoeConfig's default, as in Qwen3-30B-A3B): transformers' GGUF loader does
    not read a file's expert width (expert_feed_forward_length) and builds experts of the config
    default, so other widths fail to load with a size mismatch. norm_topk_prob=True: what the GGUF
    loader sets (llama.cpp's routing)."""
    cfg = Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=experts, num_experts_per_tok=top_k,
                         moe_intermediate_size=expert_width, norm_topk_prob=True, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg)


def mixtral() -> PreTrainedModel:
    """4 experts of width 256 (intermediate_size), top-2."""
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                            tie_word_embeddings=False))


BUILDERS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gemma2": gemma2, "gemma3": gemma3,
            "phi3": phi3, "qwen3_moe": qwen3_moe, "mixtral": mixtral}


def tiny_model(family: str, seed: int = 0, **kw) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = BUILDERS[family](**kw)
    _perturb_norms(model)
    return model.eval()


def save_fp(model: PreTrainedModel, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# A tiny GGUF writer (F32 tensors), the inverse of transformers' GGUF loader
# ----------------------------------------------------------------------------------------------

# model_type -> GGUF architecture (llama.cpp's names; llama.cpp writes Mistral as "llama" and transformers
# reads a "llama" file whose general.name contains "mistral" as Mistral).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3_text": "gemma3",
             "phi3": "phi3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}


def _hf_to_gguf_names(model: PreTrainedModel) -> dict[str, str]:
    """{hf tensor name: gguf tensor name}, by the very map transformers' loader inverts (stacked MoE
    experts: their gate half is named here, :func:`write_gguf` writes the up half next to it)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = GGUF_ARCH[model.config.model_type]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={})
    names_as = "llama" if arch == "llama" else model.config.model_type
    gguf_to_hf = get_gguf_hf_weights_map(model, processor, model_type=names_as)
    out: dict[str, str] = {}
    for gguf, hf in gguf_to_hf.items():
        if ".ffn_up_exps" not in gguf:
            out[hf] = gguf
    for i in range(model.config.num_hidden_layers):  # stacked experts, as llama.cpp names them in every arch
        out.setdefault(f"model.layers.{i}.mlp.experts.gate_up_proj", f"blk.{i}.ffn_gate_exps")
        out.setdefault(f"model.layers.{i}.mlp.experts.down_proj", f"blk.{i}.ffn_down_exps")
    return out


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_byte_level_bpe(writer, tokenizer, vocab_size: int) -> None:
    """The byte tokenizer as a GGUF "gpt2" byte-level BPE (as llama.cpp writes LLaMA-3/Qwen2/SmolLM2 files),
    padded to the model's vocab: transformers rebuilds the same ids."""
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 or i >= len(vocab) else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from single bytes
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)


def _add_sentencepiece_bytes(writer, vocab_size: int) -> None:
    """A GGUF "llama" (sentencepiece) vocab as Gemma files carry: <pad> <eos> <bos> <unk>, the 256 byte-fallback
    tokens, "▁" (the space), padding. transformers builds its GemmaTokenizer from it, a tokenizer
    that survives save_pretrained (a byte-level vocab in a Gemma file would not: GemmaTokenizer
    re-imposes its sentencepiece normalizer on reload)."""
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types += [gguf.TokenType.CONTROL] * (vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)


def write_gguf(model: PreTrainedModel, tokenizer, path: Path, name: str = "tiny") -> Path:
    """Write ``model`` (LLaMA/Mistral, Qwen2, Gemma 2/3, Phi-3, Qwen3-MoE layouts) as an F32 GGUF, with the
    byte tokenizer (a byte-fallback sentencepiece vocab for Gemma, as Gemma files carry)."""
    import gguf

    cfg = model.config
    model_type = cfg.model_type
    arch = GGUF_ARCH[model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"{model_type}-{name}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", rope.get("full_attention", {}).get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        if arch == "llama":
            writer.add_rope_dimension_count(cfg.head_dim)
    if getattr(cfg, "sliding_window", None) and arch.startswith("gemma"):
        writer.add_sliding_window(cfg.sliding_window)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    if arch.startswith("gemma"):
        _add_sentencepiece_bytes(writer, cfg.vocab_size)
    else:
        _add_byte_level_bpe(writer, tokenizer, cfg.vocab_size)

    names = _hf_to_gguf_names(model)
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if t.untyped_storage().data_ptr() in seen:  # a tied head is not written: the loader re-ties it
            continue
        seen.add(t.untyped_storage().data_ptr())
        if key not in names:
            raise KeyError(f"{model_type}: no GGUF name for {key}")
        w = t.detach().float().clone()
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            w = _llama_permute(w, heads)
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            w = w + 1  # llama.cpp stores Gemma's (1 + w) norms; transformers subtracts the 1 again
        if key.endswith("experts.gate_up_proj"):  # [E, 2F, D] -> ffn_gate_exps, ffn_up_exps [E, F, D]
            gate, up = w.chunk(2, dim=1)
            writer.add_tensor(names[key] + ".weight", gate.contiguous().numpy())
            writer.add_tensor(names[key].replace("ffn_gate_exps", "ffn_up_exps") + ".weight", up.contiguous().numpy())
            continue
        if key.endswith("experts.down_proj"):
            writer.add_tensor(names[key] + ".weight", w.numpy())
            continue
        writer.add_tensor(names[key], w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
