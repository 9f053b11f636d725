"""Reading GPTQ checkpoints (GPTQModel / AutoGPTQ lineage) exactly into the canonical format.

GPTQ v1/v2 layout, per layer with D_in inputs, D_out outputs, L groups:

- ``qweight`` int32 [D_in*bits/32, D_out]: along D_in, each column is a little-endian bit stream
  of codes (2/4/8 bit: 32/bits codes per word; 3 bit: 32 codes in every 3 words as one 96-bit
  stream). That is the canonical per-row stream of :mod:`qalora.lowbit`, transposed.
- ``qzeros`` int32 [L, D_out*bits/32]: the same stream along D_out, one row per group. Format v1
  stores zero-1: GPTQModel writes it by subtracting 0x..0101 from every *word* (with borrow
  across fields) at 2/4/8 bit, and field by field mod 8 at 3 bit. The reader undoes exactly
  that: word-wise add with carry at 2/4/8 bit (a field-wise +1 would be wrong wherever a zero
  is 0), field-wise +1 mod 8 at 3 bit. v2 stores the zeros themselves.
- ``scales`` fp16 [L, D_out], ``g_idx`` int32 [D_in] (must be i // g: contiguous groups),
  optional ``bias`` (fp16 in GPTQModel checkpoints).

GPTQModel then dequantizes W = scales[g] * (q - z). The canonical layer stores the same integer
codes, the same fp16 scales and the same integer zeros as fp32 floats, so its fp32 dequantization
is the exact product and GPTQModel's fp16 kernel result is that product rounded to fp16.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from qalora.lowbit import check_bits, unpack_codes
from qalora.model_io import set_submodule
from qalora.quantizers.surgery import lowbit_from_linear

_QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


class GPTQLayer(NamedTuple):
    """One layer read from a GPTQ checkpoint, in canonical orientation.

    codes uint8 [D_out, D_in], scales fp16 [D_out, L], zeros fp32 [D_out, L] (integer valued),
    bias fp32 [D_out] or None; W = scales * (codes - zeros) group-wise.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int



def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32/int64 words [..., n] (low 32 bits used) -> uint8 [..., 4n], little-endian per word."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=w.device)
    return ((w.unsqueeze(-1) >> shifts) & 0xFF).reshape(*w.shape[:-1], -1).to(torch.uint8)


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Rows of int32 words [R, n] holding little-endian code streams -> uint8 codes [R, count]."""
    codes = unpack_codes(_words_to_bytes(words), bits)
    if codes.shape[1] < count:
        raise ValueError(f"packed stream holds {codes.shape[1]} codes, fewer than the {count} expected")
    return codes[:, :count]


def _v1_word_offset(bits: int) -> int:
    """0x..0101: a 1 in every ``bits``-wide field of a 32-bit word (2/4/8 bit)."""
    return sum(1 << (bits * j) for j in range(32 // bits))


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [L, D_out*bits/32] -> integer zeros uint8 [L, D_out] (v1: undoes the zero-1)."""
    check_bits(bits)
    if v1 and bits != 3:
        # GPTQModel stored (word - 0x..0101) mod 2^32: a word-wise subtraction that borrows across
        # fields when a zero is 0. Adding it back word-wise (with carry) restores every field.
        words = (qzeros.to(torch.int64) + _v1_word_offset(bits)) & 0xFFFFFFFF
        return _unpack_stream(words, bits, out_features)
    zeros = _unpack_stream(qzeros, bits, out_features)
    if v1:  # 3 bit: GPTQModel shifts each decoded field by -1 mod 8, so undo it field by field
        zeros = ((zeros.to(torch.int16) + 1) & 0x7).to(torch.uint8)
    return zeros


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [D_in*bits/32, D_out] -> codes uint8 [D_out, D_in]."""
    check_bits(bits)
    return _unpack_stream(qweight.t().contiguous(), bits, in_features)


def read_gptq_config(folder: str | Path) -> dict[str, Any]:
    """The quantization config of a GPTQ checkpoint folder (quantize_config.json or config.json)."""
    folder = Path(folder)
    for name in _QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    if (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text()).get("quantization_config")
        if cfg:
            return cfg
    raise FileNotFoundError(f"{folder} has no quantize_config.json nor a quantization_config in config.json: "
                            "not a GPTQ checkpoint")


def _checkpoint_format(cfg: dict[str, Any]) -> str:
    method = str(cfg.get("quant_method") or cfg.get("method") or "gptq").lower()
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if method != "gptq" or fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"unsupported checkpoint: quant_method={method!r}, checkpoint_format={fmt!r}; "
                         "qalora reads GPTQ checkpoints in format 'gptq' (v1) or 'gptq_v2'")
    pack = str(cfg.get("pack_dtype", "int32")).replace("torch.", "")
    if pack != "int32":
        raise ValueError(f"unsupported pack_dtype={pack!r}: qalora reads int32-packed GPTQ checkpoints")
    return fmt


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def read_gptq_checkpoint(folder: str | Path) -> dict[str, GPTQLayer]:
    """Every quantized layer of a GPTQModel/AutoGPTQ-style GPTQ checkpoint, exactly.

    Returns ``{layer_name: GPTQLayer(codes, scales, zeros, bias, bits, group_size)}`` in file
    order. Bits and group size are derived per layer from the tensor shapes (so per-layer
    ``dynamic`` overrides work) and checked against the config when it names them. Raises if a
    layer's groups are not contiguous (act-order / desc_act checkpoints cannot be represented in
    the canonical format) or the format is not GPTQ v1/v2 with int32 words.
    """
    folder = Path(folder)
    cfg = read_gptq_config(folder)
    v1 = _checkpoint_format(cfg) == "gptq"
    files = _safetensors_files(folder)
    keys_by_file: dict[Path, list[str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys_by_file[path] = list(f.keys())
    all_keys = [k for keys in keys_by_file.values() for k in keys]
    order = [k[: -len(".qweight")] for k in all_keys if k.endswith(".qweight")]
    orphans = sorted({k.rpartition(".")[0] for k in all_keys if k.endswith((".qzeros", ".scales", ".g_idx"))}
                     - set(order))
    if orphans:
        raise ValueError(f"{folder}: tensors {orphans[:3]} have qzeros/scales/g_idx but no qweight")
    if not order:
        raise ValueError(f"{folder}: no GPTQ layers (*.qweight tensors) in {[p.name for p in files]}")
    wanted = set(order)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in order}
    for path, keys in keys_by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                prefix, _, leaf = k.rpartition(".")
                if prefix in wanted and leaf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    parts[prefix][leaf] = f.get_tensor(k)
    layers: dict[str, GPTQLayer] = {}
    for name in order:
        layers[name] = _convert_layer(name, parts[name], cfg, v1)
    return layers


def _convert_layer(name: str, t: dict[str, torch.Tensor], cfg: dict[str, Any], v1: bool) -> GPTQLayer:
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in t]
    if missing:
        raise ValueError(f"GPTQ layer {name} lacks {missing}")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"GPTQ layer {name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if scales.dtype != torch.float16:
        raise ValueError(f"GPTQ layer {name}: scales are {scales.dtype}; GPTQ checkpoints store fp16 scales")
    n_groups, d_out = scales.shape
    g_idx = t.get("g_idx")
    d_in = g_idx.numel() if g_idx is not None else None
    if d_in is None:  # no g_idx (old AutoGPTQ without act-order): D_in from the config's group size
        d_in = n_groups * int(cfg["group_size"])
    bits, rem = divmod(qweight.shape[0] * 32, d_in)
    if rem or bits not in (2, 3, 4, 8) or qweight.shape[1] != d_out:
        raise ValueError(f"GPTQ layer {name}: qweight {tuple(qweight.shape)} does not fit D_in={d_in}, "
                         f"D_out={d_out} at 2/3/4/8 bit")
    group_size, rem = divmod(d_in, n_groups)
    if rem:
        raise ValueError(f"GPTQ layer {name}: {n_groups} groups do not divide D_in={d_in}")
    if not cfg.get("dynamic"):
        want_bits, want_group = cfg.get("bits"), cfg.get("group_size")
        if want_bits is not None and int(want_bits) != bits:
            raise ValueError(f"GPTQ layer {name} is {bits}-bit by its shapes but the config says bits={want_bits}")
        if want_group not in (None, -1) and int(want_group) != group_size:
            raise ValueError(f"GPTQ layer {name} has group size {group_size} but the config says {want_group}")
    if g_idx is not None:
        contiguous = torch.arange(d_in, dtype=torch.int64) // group_size
        if not torch.equal(g_idx.to(torch.int64), contiguous):
            raise ValueError(
                f"GPTQ layer {name}: g_idx is not contiguous (i // {group_size}); act-order (desc_act=True) "
                "checkpoints cannot be represented with contiguous groups - quantize with desc_act=False")
    if qzeros.shape != (n_groups, d_out * bits // 32):
        raise ValueError(f"GPTQ layer {name}: qzeros {tuple(qzeros.shape)} != {(n_groups, d_out * bits // 32)}")
    codes = unpack_gptq_qweight(qweight, bits, d_in)
    zeros = unpack_gptq_zeros(qzeros, bits, d_out, v1=v1).t().to(torch.float32).contiguous()
    bias = t.get("bias")
    return GPTQLayer(
        codes=codes,
        scales=scales.t().contiguous(),
        zeros=zeros,
        bias=None if bias is None else bias.to(torch.float32),
        bits=bits,
        group_size=group_size,
    )


def apply_gptq_layers(
    model: nn.Module, layers: dict[str, GPTQLayer], use_checkpoint_bias: bool = False
) -> list[str]:
    """Replace the model's nn.Linear named in ``layers`` with canonical LowBitLinear layers.

    The bias is taken from the model's own linear (fp32; GPTQModel stores biases in fp16) unless
    ``use_checkpoint_bias``.
    """
    done = []
    for name, layer in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"GPTQ layer {name} does not exist in the model") from e
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, not nn.Linear: already quantized?")
        if (linear.out_features, linear.in_features) != tuple(layer.codes.shape):
            raise ValueError(f"GPTQ layer {name} is {tuple(layer.codes.shape)} but the model's linear is "
                             f"{(linear.out_features, linear.in_features)}")
        new = lowbit_from_linear(linear, layer.codes, layer.scales, layer.zeros, layer.bits, layer.group_size, name)
        if use_checkpoint_bias and layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
        set_submodule(model, name, new.to(linear.weight.device))
        done.append(name)
    return done


def apply_gptq_checkpoint(model: nn.Module, folder: str | Path, targets: Sequence[str] | None = None) -> list[str]:
    """Convert a GPTQ checkpoint of ``model``'s architecture into its canonical layers, in place.

    ``model`` is the full-precision model the checkpoint was made from (its non-quantized tensors
    are kept as they are). ``targets`` restricts the layers by last name component.
    """
    layers = read_gptq_checkpoint(folder)
    if targets is not None:
        layers = {n: v for n, v in layers.items() if n.split(".")[-1] in set(targets)}
    return apply_gptq_layers(model, layers, use_checkpoint_bias=True)

