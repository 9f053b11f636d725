"""GGUF export (llama.cpp, Ollama, LM Studio, transformers' GGUF loader) with Q4_1 projections.

GGUF's Q4_1 block holds 32 weights of one row as ``w = d * q + m`` with a 4-bit code ``q`` and fp16
``d`` and ``m``. The canonical format's ``W_hat = s * (q - z) = s * q + (-s * z)`` is that form with
``d = s`` (an fp16 already: exact) and ``m = -s * z``, computed in fp64 and rounded once to fp16. So a
merged model (float zeros) exports with the same codes and scales; the one error is the fp16 rounding
of ``m``: at most half an fp16 ulp of ``|s * z|``, i.e. ``|z| * 2^-11`` quantization steps (< 0.008 of
a step for 4-bit zeros in [0, 15]; the export report measures it on the file written).

What Q4_1 can hold, and what is refused (:func:`check_gguf`, messages name the limit):

- groups: every 32-block must lie in one group, so the group size must be a multiple of 32
  (g = 32: one block per group; g = 64/128: 2/4 blocks share d and m). g = 16 is refused.
- bits: 4-bit codes are Q4_1's own. 2- and 3-bit codes (< 16) are held exactly in the 4-bit container
  (the weights are the same; the file is 4 + 1 bits/weight instead of 2-3 + ~0.75): exported, and the
  report says so (``container_bits`` vs ``code_bits``). GGUF has no exact 2/3-bit type (its K-quants
  are super-blocks with 6-bit quantized scales). 8-bit codes do not fit in 4 bits, and Q8_0 has no
  offset for a float zero: refused (HQQ holds 8 bit exactly).
- architecture: LLaMA (``model_type`` "llama", llama.cpp's "llama") without rope scaling or biases.
- tokenizer: byte-level BPE (GGUF "gpt2", as SmolLM2's); its pre-tokenizer is named from
  tokenizer.json (override with ``tokenizer_pre``).

Layout follows llama.cpp's converter: ``blk.N.attn_q.weight`` etc. (gguf-py's tensor map), q/k rows
permuted per head (convert_hf_to_gguf's ``permute``; readers invert it). A row moves with its scales
and zeros, so the permutation costs nothing. Embeddings (and an untied head) are F32 by default
(``dense_type="f16"`` halves them at fp16 rounding); norms are F32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qalora.export.errors import ExportError

QK4_1 = 32  # weights per Q4_1 block
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
ARCHITECTURES = {"llama": "llama"}  # transformers model_type -> llama.cpp architecture


class GGUFExportError(ExportError):
    """The model cannot be held exactly by GGUF Q4_1; the message names the limit."""


# --- what Q4_1 can hold -------------------------------------------------------------------------

def check_gguf(config, quant: dict[str, Any]) -> dict[str, Any]:
    """Refuse (GGUFExportError naming the limit) a model GGUF Q4_1 cannot hold exactly; return a
    summary of how it will be stored."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports architecture {sorted(ARCHITECTURES)} (llama.cpp 'llama'); this model is "
            f"model_type={model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"GGUF export: rope_type={rope_type!r} (rope scaling) is not exported; only default RoPE")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"GGUF export: {flag}=True is not exported (LLaMA without biases only)")
    layers = quant["layers"]
    bits = sorted({spec["bits"] for spec in layers.values()})
    for name, spec in layers.items():
        b, g = spec["bits"], spec["group_size"]
        if b > 4:
            raise GGUFExportError(
                f"GGUF Q4_1 holds codes of at most 4 bits; {name} has bits={b}. GGUF has no type with a "
                "float offset for 8-bit codes (Q8_0 is symmetric): export it to HQQ instead")
        if g % QK4_1:
            raise GGUFExportError(
                f"GGUF Q4_1 blocks are {QK4_1} weights sharing one scale and offset, so the group size must be a "
                f"multiple of {QK4_1}; {name} has group_size={g} (valid: 32, 64, 128, ...)")
        if spec["bias"]:
            raise GGUFExportError(f"GGUF export: {name} has a bias, which the LLaMA export does not write")
    return {"tensor_type": "Q4_1", "container_bits": 4, "code_bits": bits,
            "group_sizes": sorted({spec["group_size"] for spec in layers.values()}),
            "note": None if bits == [4] else
            f"{'/'.join(map(str, bits))}-bit codes stored exactly in 4-bit Q4_1 containers (no exact lower-bit GGUF type)"}


# --- Q4_1 blocks --------------------------------------------------------------------------------

def q4_1_offsets(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Q4_1's fp16 ``m = -s * z`` per group: fp64 product rounded once to fp16. Raises on fp16 overflow."""
    m = -(scales.double() * zeros.double())
    if m.abs().max().item() > 65504:
        raise GGUFExportError(f"GGUF Q4_1: offset -s*z = {m.abs().max().item():.4g} overflows fp16 (max 65504)")
    return m.to(torch.float16)


def pack_q4_1(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> np.ndarray:
    """Codes [R, C] (< 16), fp16 scales and float zeros [R, C/g] -> Q4_1 bytes uint8 [R, C/32 * 20].

    Block layout (ggml's block_q4_1): fp16 d, fp16 m, then 16 bytes where byte j holds q[j] in its
    low nibble and q[j + 16] in its high nibble.
    """
    rows, cols = codes.shape
    if group_size % QK4_1 or cols % group_size:
        raise GGUFExportError(f"Q4_1 needs the group size ({group_size}) a multiple of {QK4_1} dividing D_in ({cols})")
    if int(codes.max()) > 15:
        raise GGUFExportError(f"Q4_1 holds codes < 16; got {int(codes.max())}")
    per_group = group_size // QK4_1
    d = scales.to(torch.float16).repeat_interleave(per_group, dim=1)  # [R, C/32]
    m = q4_1_offsets(scales, zeros).repeat_interleave(per_group, dim=1)
    q = codes.to(torch.uint8).reshape(rows, cols // QK4_1, QK4_1)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # [R, nb, 16]
    blocks = torch.cat([d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), nibbles], dim=-1)
    return blocks.reshape(rows, cols // QK4_1 * Q4_1_BYTES).contiguous().numpy()


def llama_permute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: GGUF row r holds HF row ``perm[r]``."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


# --- tokenizer ----------------------------------------------------------------------------------

def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or GGUFExportError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # HF ByteLevel's regex is GPT-2's: llama.cpp's "gpt-2" pre-tokenizer
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    raise GGUFExportError(f"GGUF export: no llama.cpp pre-tokenizer known for pre_tokenizer {kinds}; pass tokenizer_pre")


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """The tokenizer as GGUF "gpt2" (byte-level BPE) metadata, or GGUFExportError naming what does not fit."""
    import gguf

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    pre_tok = tj.get("pre_tokenizer") or {}
    parts = pre_tok.get("pretokenizers", [pre_tok])
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in parts):
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers (GGUF 'gpt2'); this one is "
                              f"{model.get('type')} with pre_tokenizer {pre_tok.get('type')}")
    pre = pre or tokenizer_pre(tj)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size={vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # gguf-py writes no empty array, and llama.cpp refuses a "gpt2" vocabulary without merges
        raise GGUFExportError("GGUF export: the BPE tokenizer has no merges; llama.cpp needs tokenizer.ggml.merges")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")}
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "add_bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
            "add_eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None), "vocab": len(vocab)}


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """Write the tokenizer's GGUF metadata; returns a summary."""
    meta = tokenizer_metadata(tokenizer, vocab_size, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    adders = {"bos_token_id": writer.add_bos_token_id, "eos_token_id": writer.add_eos_token_id,
              "unk_token_id": writer.add_unk_token_id, "pad_token_id": writer.add_pad_token_id}
    for key, tid in meta["ids"].items():
        if tid is not None:
            adders[key](int(tid))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    writer.add_add_space_prefix(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
    return {"model": "gpt2", "pre": meta["pre"], "tokens": meta["vocab"], "padded_to": vocab_size,
            "merges": len(meta["merges"]), "add_bos": bool(meta["add_bos"])}


# --- the file -----------------------------------------------------------------------------------

def _gguf_names(model, n_blocks: int) -> dict[str, str]:
    """{HF state-dict key: GGUF tensor name} by gguf-py's LLaMA tensor map."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    names = {}
    for key in model.state_dict():
        base, _, leaf = key.rpartition(".")
        if leaf in ("scales", "zeros"):  # LowBitLinear buffers travel with its qweight
            continue
        if leaf == "qweight":
            key = base + ".weight"
        if "rotary_emb" in key:
            continue
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"GGUF export: no llama.cpp tensor name for {key}")
        names[key] = name
    return names


def write_gguf(model, tokenizer, quant: dict[str, Any], path: str | Path, *, name: str = "qalora",
               dense_type: str = "f32", tokenizer_pre: str | None = None) -> dict[str, Any]:
    """Write the low-bit ``model`` (LowBitLinear layers) as a LLaMA GGUF at ``path``; returns a summary."""
    import gguf

    from qalora.lowbit import LowBitLinear

    if dense_type not in ("f32", "f16"):
        raise ValueError(f"dense_type={dense_type!r}: valid are f32, f16")
    cfg = model.config
    storage = check_gguf(cfg, quant)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[cfg.model_type])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(cfg, "rope_theta", None)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = add_tokenizer(writer, tokenizer, cfg.vocab_size, tokenizer_pre)

    names = _gguf_names(model, cfg.num_hidden_layers)
    modules = dict(model.named_modules())
    seen: set[int] = set()
    written = {}
    for key, t in model.state_dict().items():
        base, _, leaf = key.rpartition(".")
        layer = modules.get(base)
        if isinstance(layer, LowBitLinear):
            if leaf != "qweight":
                continue
            codes, scales, zeros = layer.codes(), layer.scales, layer.zeros
            if base.endswith(("q_proj", "k_proj")):
                perm = llama_permute_rows(codes.shape[0], n_head if base.endswith("q_proj") else n_kv)
                codes, scales, zeros = codes[perm], scales[perm], zeros[perm]
            gname = names[base + ".weight"]
            writer.add_tensor(gname, pack_q4_1(codes, scales, zeros, layer.group_size),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            written[gname] = "Q4_1"
            continue
        if key not in names:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen:  # a tied head is not written: llama.cpp and transformers reuse token_embd
            continue
        seen.add(ptr)
        w = t.detach().float().cpu()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            w = w[llama_permute_rows(w.shape[0], n_head if "q_proj" in key else n_kv)]
        as_f16 = dense_type == "f16" and w.ndim == 2
        arr = w.to(torch.float16).numpy() if as_f16 else w.numpy()
        writer.add_tensor(names[key], arr)
        written[names[key]] = "F16" if as_f16 else "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**storage, "architecture": ARCHITECTURES[cfg.model_type], "tokenizer": tok,
            "tensors": len(written), "q4_1_tensors": sum(v == "Q4_1" for v in written.values()),
            "dense_type": dense_type, "file_bytes": Path(path).stat().st_size}


# --- reading it back ----------------------------------------------------------------------------

def read_weights(path: str | Path, config) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: fp32 weight in HF layout}: every tensor dequantized by gguf-py's own
    reference (``gguf.quants.dequantize``), q/k rows un-permuted."""
    import gguf

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())])
        if ".attn_q." in t.name or ".attn_k." in t.name:
            perm = llama_permute_rows(w.shape[0], n_head if ".attn_q." in t.name else n_kv)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(len(perm))
            w = w[inv]
        out[t.name] = w
    return out


def weight_error(model, path: str | Path) -> dict[str, Any]:
    """Max error of the file's weights against the canonical model's fp32 weights: in quantization
    steps (|dW| / s) for the quantized projections, absolute for the rest."""
    from qalora.lowbit import LowBitLinear

    cfg = model.config
    names = _gguf_names(model, cfg.num_hidden_layers)
    file_w = read_weights(path, cfg)
    modules = dict(model.named_modules())
    steps, abs_q, abs_dense, worst = 0.0, 0.0, 0.0, None
    compared = 0
    for key, t in model.state_dict().items():
        base, _, leaf = key.rpartition(".")
        layer = modules.get(base)
        if isinstance(layer, LowBitLinear):
            if leaf != "qweight":
                continue
            ref = layer.dequantized_weight()
            got = file_w[names[base + ".weight"]]
            diff = (got - ref).abs()
            s = layer.scales.float().repeat_interleave(layer.group_size, dim=1)
            st = (diff / s).max().item()
            if st >= steps:
                steps, worst = st, base
            abs_q = max(abs_q, diff.max().item())
            compared += 1
        elif key in names and names[key] in file_w:
            abs_dense = max(abs_dense, (file_w[names[key]] - t.float()).abs().max().item())
            compared += 1
    return {"max_error_steps": steps, "worst_layer": worst, "max_abs_error_quantized": abs_q,
            "max_abs_error_dense": abs_dense, "tensors_compared": compared}
