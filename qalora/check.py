"""The bit-exactness check of a merge (DESIGN.md §3): five checks, each with its figures.

1. codes      every layer's packed codes sha256-identical to the tuned base
2. scales     scales (and every other tensor but the zeros) identical; only zeros moved
3. logits     merged vs unmerged (base + adapter) logits in fp32: max relative L2 error <= rel_tol,
              greedy continuations token-identical
4. deploy     the deploy path of every merged layer (qalora.kernels) in fp32 and bf16 vs an fp64
              dequant matmul, within each dtype's rounding bound (D_in * eps, the classic
              dot-product bound)
5. roundtrip  save -> reload of the merged model reproduces every tensor byte for byte
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from qalora.adapter import load_adapter_into
from qalora.checkpoint import (
    load_lowbit_model, load_tensors, lowbit_layers, model_identity, read_quant_config, save_lowbit_model,
    unique_state_dict,
)
from qalora.config import CheckParams
from qalora.data import alpaca_prompt
from qalora.manifest import sha256_tensor


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
    for prompt in p.prompts:
        ids = tokenizer(alpaca_prompt(prompt), return_tensors="pt").input_ids
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
        x = torch.randn(rows, layer.in_features, generator=g, dtype=torch.float64)
        w = layer.dequantized_weight().double()
        ref = x @ w.t()
        scale = x.abs() @ w.abs().t()  # |x| |W|: the magnitude the rounding bound scales with
        deploy = PreparedLowBitLinear.from_layer(layer)
        backends.add(deploy.backend)
        for dtype in dtypes:
            out = deploy(x.to(dtype)).double()
            bound = scale * layer.in_features * torch.finfo(dtype).eps + 1e-30
            err = ((out - ref).abs() / bound).max().item()
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
        again, _ = unique_state_dict(reloaded)
        same_file = model_identity(out) == model_identity(merged_dir)
    differ = sorted(k for k in set(on_disk) | set(again)
                    if k not in on_disk or k not in again or sha256_tensor(on_disk[k]) != sha256_tensor(again[k]))
    return {"passed": not differ and same_file, "tensors": len(on_disk), "tensors_differing": differ[:5],
            "weights_file_identical": same_file}


def check_merge(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, params: CheckParams) -> dict[str, Any]:
    """Run all five checks; returns the report (``passed`` is the conjunction)."""
    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    codes, scales = _check_tensors(base_dir, merged_dir)
    unmerged, tokenizer, _ = load_lowbit_model(base_dir)
    load_adapter_into(unmerged, adapter_dir, base_identity=model_identity(base_dir))
    unmerged.eval()
    merged, merged_tok, _ = load_lowbit_model(merged_dir)
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
    }
