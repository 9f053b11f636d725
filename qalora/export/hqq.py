"""HQQ export (the ``hqq`` package's HQQLinear, hqq's own folder layout) with float zeros kept.

HQQ dequantizes ``W = (W_q - zero) * scale`` over groups of ``group_size`` consecutive weights of the
flattened weight (``axis=1``: along the input dimension, row-major), which is the canonical format's
``s * (q - z)`` group for group: same codes, same fp16 scales, and the zeros kept in fp32. HQQLinear casts
scale and zero to its ``compute_dtype`` when it loads them and dequantizes in that dtype, so:

- ``compute_dtype=torch.float32``: bit-identical weights to ours (the same fp32 operations);
- fp16/bf16 (HQQ's GPU default): the zeros and the dequantized weights round to that dtype, the
  consumer's own precision choice; the export report measures both.

Any group size dividing D_in and bits 2/3/4/8 fit (HQQ packs 8/4/3/2/1 bit). HQQ packs along the
flattened groups, so 4-bit needs an even number of groups per layer and 2-bit a multiple of four
(HQQ's own packer silently drops the rest): refused otherwise, naming the layer.

Files (``out/``), hqq's own layout (``AutoHQQHFModel.save_quantized``): ``config.json``, ``qmodel.pt``
({module name: state dict}; HQQLinear's for the quantized layers: ``W_q``, ``scale``, ``zero`` fp32,
``nbits``, ``shape``, ...) and the tokenizer. Load with
``hqq.models.hf.base.AutoHQQHFModel.from_quantized(out, compute_dtype=..., device=...)``.
transformers 5.23's ``HqqConfig`` path cannot load a pre-quantized HQQ folder (its HqqHfQuantizer has no
deserialization op: the layers stay randomly initialized, with only a warning), so hqq is the consumer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from qalora.export.errors import ExportError

PACKING = {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}
VIEW_DTYPE = {8: torch.uint8, 4: torch.uint8, 3: torch.int32, 2: torch.uint8}
WEIGHTS = "qmodel.pt"  # hqq's BaseHQQModel.get_weight_file


class HQQExportError(ExportError):
    """The model cannot be held by HQQ; the message names the limit."""


def check_hqq(config, quant: dict[str, Any]) -> dict[str, Any]:
    for name, spec in quant["layers"].items():
        b, g = spec["bits"], spec["group_size"]
        if b not in PACKING:
            raise HQQExportError(f"HQQ export: {name} has bits={b}; valid {sorted(PACKING)}")
        groups = spec["out_features"] * spec["in_features"] // g
        need = {4: 2, 2: 4}.get(b, 1)
        if groups % need:
            raise HQQExportError(
                f"HQQ packs {b}-bit codes {need} groups at a time along the flattened weight; {name} has "
                f"{groups} groups (D_out*D_in/group_size), not a multiple of {need}")
    return {"code_bits": sorted({s["bits"] for s in quant["layers"].values()}),
            "group_sizes": sorted({s["group_size"] for s in quant["layers"].values()}), "axis": 1}


def pack_hqq(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, g] (one group per row) -> HQQ's packed W_q (hqq.core.bitpack.BitPack.pack_*)."""
    q = groups.to(torch.uint8)
    n = q.shape[0]
    if bits == 8:
        return q.contiguous()
    if bits == 4:
        h = n // 2
        return ((q[:h] << 4) | q[h:]).contiguous()
    if bits == 2:
        h = n // 4
        return ((q[:h] << 6) | (q[h:2 * h] << 4) | (q[2 * h:3 * h] << 2) | q[3 * h:]).contiguous()
    if bits == 3:
        padded = torch.zeros(-(-n // 10) * 10, q.shape[1], dtype=torch.int32)
        padded[:n] = q.to(torch.int32)
        h = padded.shape[0] // 10
        out = torch.zeros(h, q.shape[1], dtype=torch.int32)
        for i in range(10):
            out |= padded[i * h:(i + 1) * h] << (27 - 3 * i)
        return out
    raise HQQExportError(f"HQQ export: bits={bits}; valid {sorted(PACKING)}")


def hqq_layer_state(layer, zero_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A LowBitLinear as the state dict hqq's HQQLinear saves and loads (``encoded_state_dict=False``)."""
    bits, g = layer.bits, layer.group_size
    rows, cols = layer.out_features, layer.in_features
    codes = layer.codes().reshape(rows * cols // g, g)
    wqp = {"nbits": bits, "channel_wise": True, "group_size": g, "optimize": False, "round_zero": False,
           "axis": 1, "view_as_float": False}
    state: dict[str, Any] = {
        "W_q": pack_hqq(codes, bits),
        "scale": layer.scales.reshape(-1, 1).to(torch.float16).contiguous(),
        "zero": layer.zeros.reshape(-1, 1).to(zero_dtype).contiguous(),
        "shape": torch.Size([rows, cols]), "packing": PACKING[bits], "unpack_view_dtype": VIEW_DTYPE[bits],
        "quant_scale": False, "quant_zero": False, "offload_meta": False, "stores_quant_config": True, **wqp,
    }
    if layer.bias is not None:
        state["bias"] = layer.bias.float().contiguous()
    return state


def write_hqq(model, tokenizer, quant: dict[str, Any], folder: str | Path, *,
              zero_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``model`` (LowBitLinear layers) into ``folder`` as hqq's ``AutoHQQHFModel.save_quantized``
    does (config.json + qmodel.pt: {module name: its state dict}); returns a summary."""
    from qalora.checkpoint import lowbit_layers

    storage = check_hqq(model.config, quant)
    folder = Path(folder)
    layers = lowbit_layers(model)
    weights: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if name in layers:
            weights[name] = hqq_layer_state(layers[name], zero_dtype)
        elif not any(True for _ in module.children()):
            # leaf modules with parameters (embeddings, norms, the head; a tied head is written again:
            # hqq's loader needs every linear layer's weights)
            params = {k: v.detach().contiguous().clone() for k, v in module.named_parameters(recurse=False)}
            if params:
                weights[name] = params
    torch.save(weights, folder / WEIGHTS)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # hqq picks the Auto class from it
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {**storage, "zero_dtype": str(zero_dtype).replace("torch.", ""), "layout": "hqq AutoHQQHFModel (qmodel.pt)",
            "file_bytes": (folder / WEIGHTS).stat().st_size}


def load_hqq(folder: str | Path, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The consumer: hqq's own ``AutoHQQHFModel.from_quantized`` (HQQLinear layers)."""
    from hqq.models.hf.base import AutoHQQHFModel

    return AutoHQQHFModel.from_quantized(str(folder), compute_dtype=compute_dtype, device=device).eval()


def weight_error(model, hqq_model) -> dict[str, Any]:
    """Max error of the HQQ layers' dequantized weights (their compute dtype) against ours, in steps."""
    from qalora.checkpoint import lowbit_layers

    hq = dict(hqq_model.named_modules())
    steps, abs_err, worst = 0.0, 0.0, None
    for name, layer in lowbit_layers(model).items():
        ref = layer.dequantized_weight()
        got = hq[name].dequantize().float().reshape(ref.shape)
        diff = (got - ref).abs()
        st = (diff / layer.scales.float().repeat_interleave(layer.group_size, dim=1)).max().item()
        if st >= steps:
            steps, worst = st, name
        abs_err = max(abs_err, diff.max().item())
    return {"max_error_steps": steps, "worst_layer": worst, "max_abs_error_quantized": abs_err}
