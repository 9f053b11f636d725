"""The bit-exactness check of a merge (docs/design.md, "The check"): five checks, each with its figures.

1. codes      every layer's packed codes sha256-identical to the tuned base
2. scales     scales (and every other tensor but the zeros) identical; only zeros moved
3. logits     merged vs unmerged (base + adapter) logits in fp32: max relative L2 error <= rel_tol,
              greedy continuations token-identical
4. deploy     the deploy path of every merged layer (qalora.kernels) in fp32 and bf16 vs an fp64
              dequant matmul plus the layer's bias, within each dtype's rounding bound
              (D_in * eps * |x||W|, the classic dot-product bound, + eps * (|bias| + |y|))
5. roundtrip  save -> reload of the merged model reproduces every tensor byte for byte

:func:`check_merge` returns the report; :func:`check_to_folder` is the pipeline's check stage (the
report as ``check.json`` plus the manifest). A failing check is a result, not an error: the gate
decides on it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from qalora.adapter import adapter_identity, load_adapter_into
from qalora.checkpoint import (
    folder_input, load_lowbit_model, load_tensors, lowbit_layers, model_identity, read_quant_config,
    save_lowbit_model, storage_state_dict,
)
from qalora.config import CheckParams
from qalora.data import prompt_ids
from qalora.device import resolve_device
from qalora.lowbit import cache_dequantized_for
from qalora.figures import check_figures
from qalora.manifest import atomic_output_dir, sha256_tensor, write_json_atomic, write_manifest

REPORT = "check.json"


def _check_tensors(base_dir: Path, merged_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    base_q, merged_q = read_quant_config(base_dir), read_quant_config(merged_dir)
    base_t, merged_t = load_tensors(base_dir), load_tensors(merged_dir)
    layers = sorted(base_q["layers"])
    code_mismatch = [n for n in layers if sha256_tensor(base_t[f"{n}.qweight"]) != sha256_tensor(merged_t.get(f"{n}.qweight", torch.empty(0)))]
    codes = {
        "passed": not code_mismatch and base_q["layers"] == merged_q["layers"],
        "layers": len(layers), "layers_with_changed_codes": len(code_mismatch), "first_mismatch": code_mismatch[:3],
    }
    zeros_keys = {f"{n}.zeros" for n in layers}
    other_changed = sorted(k for k in set(base_t) | set(merged_t) if k not in zeros_keys
                           and (k not in base_t or k not in merged_t or sha256_tensor(base_t[k]) != sha256_tensor(merged_t[k])))
    zeros_moved = sum(not torch.equal(base_t[k], merged_t[k]) for k in zeros_keys)
    scales = {
        "passed": not other_changed,
        "scales_identical": all(k not in other_changed for k in (f"{n}.scales" for n in layers)),
        "other_tensors_changed": other_changed[:5],
        "layers_with_moved_zeros": zeros_moved,
    }
    return codes, scales


@torch.no_grad()
def _check_logits(unmerged, merged, tokenizer, p: CheckParams) -> dict[str, Any]:
    rel, max_abs, agree, compared = 0.0, 0.0, 0, 0
    encoded = [prompt_ids(tokenizer, prompt) for prompt in p.prompts]  # every prompt, before any forward
    device = next(merged.parameters()).device
    for ids in encoded:
        ids = ids.to(device)
        ref = unmerged(ids).logits.double()
        out = merged(ids).logits.double()
        rel = max(rel, ((out - ref).norm() / ref.norm()).item())
        max_abs = max(max_abs, (out - ref).abs().max().item())
        kw = dict(max_new_tokens=p.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        g_ref = unmerged.generate(ids, **kw)[0, ids.shape[1]:]
        g_out = merged.generate(ids, **kw)[0, ids.shape[1]:]
        agree += int(torch.equal(g_ref, g_out))
        compared += len(g_ref)
    return {
        "passed": rel <= p.rel_tol and agree == len(p.prompts),
        "max_rel_error": rel, "rel_tol": p.rel_tol, "max_abs_error": max_abs,
        "greedy_identical_prompts": agree, "prompts": len(p.prompts), "greedy_tokens_compared": compared,
    }


def _deploy_bound(scale: torch.Tensor, bias: torch.Tensor, ref: torch.Tensor, d_in: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Largest error a correct deploy path in ``dtype`` may have, per output [rows, D_out] (fp64).

    ``scale`` = |x| |W|^T [rows, D_out], ``bias`` [D_out] (zeros for none), ``ref`` = x W^T + bias in
    fp64 [rows, D_out]. With u = eps/2 the unit roundoff of ``dtype``, the computed output is
    fl(fl(x W^T) + fl(bias)), each step rounding once:
      - rounding x and W to ``dtype`` and the D_in-term dot product: |error| <= (D_in + 2) u |x||W|
        to first order in u (the classic gamma_n bound), plus u |x W^T| <= u |x||W| for rounding
        the dot product before the bias is added; D_in * eps = 2 D_in u covers all three for
        D_in >= 3 (its slack also absorbs int4pack's rounding of scale and zero point to bf16);
      - rounding the bias to ``dtype``: u |bias|;
      - rounding the sum (the output) to ``dtype``: u |y| (= u |ref| to first order).
    So |out - ref| <= D_in eps |x||W| + eps |bias| + eps |ref|, the last two with a factor 2 to
    spare. The bias terms matter where a bias of tens (Qwen2 k_proj) dominates |y| while |x||W| is
    small. The 1e-30 keeps the ratio finite where every term is zero.
    """
    eps = torch.finfo(dtype).eps
    return scale * d_in * eps + eps * bias.abs() + eps * ref.abs() + 1e-30


@torch.no_grad()
def _check_deploy(merged, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                  rows: int = 4) -> dict[str, Any]:
    """The deploy path each layer gets on its device (qalora.kernels: CUDA kernels in fp16/bf16,
    int4pack on CPU for 4-bit, dequant otherwise) in each of ``dtypes``, vs an fp64 dequant matmul.

    Both dtypes run because the paths differ by dtype: on CPU fp32 is the exact dequantized matmul
    and bf16 the int4pack kernel; on CUDA fp32 is the reference path and bf16 the CUDA kernel.
    """
    from qalora.kernels import PreparedLowBitLinear

    by_dtype: dict[str, dict[str, Any]] = {}
    backends: set[str] = set()
    g = torch.Generator().manual_seed(0)
    for name, layer in lowbit_layers(merged).items():
        x = torch.randn(rows, layer.in_features, generator=g, dtype=torch.float64).to(layer.qweight.device)
        w = layer.dequantized_weight().double()
        # The deploy path adds the layer's bias (Qwen2 k_proj: biases of tens), so the reference does too.
        bias = torch.zeros_like(w[:, 0]) if layer.bias is None else layer.bias.double()
        ref = x @ w.t() + bias
        scale = x.abs() @ w.abs().t()  # |x| |W|: the magnitude the dot-product rounding scales with
        deploy = PreparedLowBitLinear.from_layer(layer)
        backends.add(deploy.backend)
        for dtype in dtypes:
            out = deploy(x.to(dtype)).double()
            err = ((out - ref).abs() / _deploy_bound(scale, bias, ref, layer.in_features, dtype)).max().item()
            worst = by_dtype.setdefault(str(dtype).removeprefix("torch."), {"max_error_over_bound": 0.0,
                                                                            "worst_layer": None})
            if err > worst["max_error_over_bound"]:
                worst.update(max_error_over_bound=err, worst_layer=name)
    worst_error = max((d["max_error_over_bound"] for d in by_dtype.values()), default=0.0)
    return {"passed": worst_error <= 1.0, "dtypes": sorted(by_dtype), "backends": sorted(backends),
            "max_error_over_bound": worst_error, "by_dtype": by_dtype}


def _check_roundtrip(merged, tokenizer, merged_dir: Path) -> dict[str, Any]:
    on_disk = load_tensors(merged_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "roundtrip"
        save_lowbit_model(merged, tokenizer, out, method="roundtrip", stage="check", params={}, inputs={})
        reloaded, _, _ = load_lowbit_model(out)
        again, _, _ = storage_state_dict(reloaded)
        same_file = model_identity(out) == model_identity(merged_dir)
    differ = sorted(k for k in set(on_disk) | set(again)
                    if k not in on_disk or k not in again or sha256_tensor(on_disk[k]) != sha256_tensor(again[k]))
    return {"passed": not differ and same_file, "tensors": len(on_disk), "tensors_differing": differ[:5],
            "weights_file_identical": same_file}


def _cache_dequantized(model: torch.nn.Module) -> None:
    """Keep each low-bit layer's dequantized weight where :func:`cache_dequantized_for` says (on the CPU,
    where the check runs, yes). Same values as the per-call path: both are ``dequantize(...).to(dtype)``."""
    for layer in lowbit_layers(model).values():
        layer.cache_dequantized = cache_dequantized_for(layer.qweight.device)


def check_merge(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, params: CheckParams) -> dict[str, Any]:
    """Run all five checks on ``params.device``; returns the report (``passed`` is the conjunction)."""
    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    device = resolve_device(params.device, key="check.device")
    codes, scales = _check_tensors(base_dir, merged_dir)
    unmerged, tokenizer, _ = load_lowbit_model(base_dir, device=device)
    load_adapter_into(unmerged, adapter_dir, base_identity=model_identity(base_dir))
    unmerged.eval()
    merged, merged_tok, _ = load_lowbit_model(merged_dir, device=device)
    for model in (unmerged, merged):  # frozen: dequantize each layer once, not at every generated token
        _cache_dequantized(model)
    tokenizer = tokenizer or merged_tok
    if tokenizer is None:
        raise ValueError(f"{base_dir} has no tokenizer: the logits check needs one for the prompts")
    checks = {
        "codes": codes,
        "scales": scales,
        "logits": _check_logits(unmerged, merged, tokenizer, params),
        "deploy": _check_deploy(merged),
        "roundtrip": _check_roundtrip(merged, tokenizer, merged_dir),
    }
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "failed": [k for k, c in checks.items() if not c["passed"]],
        "checks": checks,
        "inputs": {"base": str(base_dir), "adapter": str(adapter_dir), "merged": str(merged_dir)},
        "device": device,
    }


def check_to_folder(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, out: str | Path,
                    params: CheckParams) -> dict[str, Any]:
    """The check stage: :func:`check_merge`, its report written as ``check.json`` with the manifest
    (metrics: :func:`qalora.figures.check_figures`) atomically to ``out``. Returns the manifest."""
    report = check_merge(base_dir, adapter_dir, merged_dir, params)
    inputs = {"base": folder_input(base_dir), "merged": folder_input(merged_dir),
              "adapter": {"path": str(adapter_dir), "sha256": adapter_identity(adapter_dir)}}
    with atomic_output_dir(out, "check") as tmp:
        write_json_atomic(tmp / REPORT, report)
        return write_manifest(tmp, "check", params.model_dump(), inputs=inputs,
                              extra={"metrics": check_figures(report)})
