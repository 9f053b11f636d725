"""Round-to-nearest (RTN) group-wise quantization and swapping nn.Linear for LowBitLinear.

RTN is the baseline and the fast path for unit tests; GPTQ lives in :mod:`qalora.gptq` and
produces the same canonical layers.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qalora.config import QuantizeParams
from qalora.lowbit import LowBitLinear, check_bits, check_group
from qalora.model_io import find_linear_targets, set_submodule


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize ``weight`` [D_out, D_in] per (row, group).

    Returns codes uint8 [D_out, D_in], scales fp16 [D_out, L], zeros fp32 [D_out, L] (integer
    valued, as GPTQ engines produce). Codes are computed against the fp16-rounded scale so the
    stored triple dequantizes to exactly what was rounded.
    """
    check_bits(bits)
    d_out, d_in = weight.shape
    maxq = (1 << bits) - 1
    w = weight.detach().to(torch.float32).reshape(d_out, d_in // group_size, group_size)
    wmin = w.amin(-1).clamp(max=0)
    wmax = w.amax(-1).clamp(min=0)
    if sym:
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float16).to(torch.float32)
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return codes.reshape(d_out, d_in).to(torch.uint8), scale.to(torch.float16), zero


def lowbit_from_linear(
    linear: nn.Linear,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    name: str,
) -> LowBitLinear:
    layer = LowBitLinear(
        linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None, name=name
    )
    layer.set_quantized(codes, scales, zeros)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach().to(torch.float32))
    return layer


def check_targets(model: nn.Module, targets: Sequence[str], group_size: int) -> dict[str, nn.Linear]:
    """The target linears, after checking the group size divides every D_in (naming the layer)."""
    layers = find_linear_targets(model, targets)
    for name, mod in layers.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear: already quantized?")
        check_group(mod.in_features, group_size, name)
    return layers


def quantize_model_rtn(
    model: nn.Module,
    bits: int,
    group_size: int,
    targets: Sequence[str],
    sym: bool = False,
    progress: bool = True,
) -> list[str]:
    """Replace every target nn.Linear of ``model`` in place; returns the quantized layer names."""
    check_bits(bits)
    layers = check_targets(model, targets, group_size)
    for name, linear in tqdm(layers.items(), desc=f"RTN int{bits}.g{group_size}", disable=not progress):
        codes, scales, zeros = rtn_quantize(linear.weight, bits, group_size, sym)
        set_submodule(model, name, lowbit_from_linear(linear, codes, scales, zeros, bits, group_size, name))
    return list(layers)


def quantize_to_folder(
    source: str,
    out: str | Path,
    params: QuantizeParams,
    calibration: str | Path | None = None,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """The quantize stage: load the fp base, quantize (GPTQ or RTN), write the canonical folder.

    ``calibration`` (text/jsonl) is required for GPTQ. Returns the folder's manifest.
    """
    import time

    from qalora.checkpoint import save_lowbit_model
    from qalora.data import calibration_windows, load_texts
    from qalora.manifest import check_output_path, sha256_file
    from qalora.model_io import load_base_model

    check_output_path(out, "quantize")  # refuse a bad --out now, not after calibration
    model, tokenizer = load_base_model(source, trust_remote_code=trust_remote_code)
    check_targets(model, params.targets, params.group_size)  # fail fast, before calibration
    inputs: dict = {"model": {"path": str(source),
                              "sha256": sha256_file(source) if Path(source).is_file() else None}}
    t0 = time.perf_counter()
    if params.method == "gptq":
        if calibration is None:
            raise ValueError("GPTQ needs calibration text: pass --calib FILE (or use --method rtn)")
        from qalora.gptq import quantize_model_gptq

        windows = calibration_windows(load_texts(calibration), tokenizer, params.calib_samples, params.calib_seq_len)
        inputs["calibration"] = {"path": str(calibration), "sha256": sha256_file(calibration)}
        work = Path(out).with_name(Path(out).name + ".gptq-work")
        try:
            quantize_model_gptq(model, tokenizer, windows, params.bits, params.group_size, params.targets,
                                sym=params.sym, damp_percent=params.damp_percent, work_dir=work,
                                progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        quantize_model_rtn(model, params.bits, params.group_size, params.targets, params.sym, progress)
    seconds = time.perf_counter() - t0
    return save_lowbit_model(model, tokenizer, out, method=params.method, stage="quantize",
                             params=params.model_dump(), inputs=inputs,
                             metrics={"quantize_seconds": seconds})
