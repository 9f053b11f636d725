"""What a run report shows, as plain data: chart rows from stage results, the three models'
side-by-side rows, and how a value is printed."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from qalora.figures import is_mmlu_subject

# The three models a run scores on the same questions: (label, figure prefix).
MODELS = (("fp", "eval_fp"), ("quantized, untuned", "eval_base"), ("merged (tuned)", "eval"))


# ----------------------------------------------------------------------------- chart rows from stage results

def latency_rows(bench_result: Mapping[str, Any]) -> list[dict[str, float]]:
    """The latency chart's rows from a benchmark result (``bench.json``): per decode batch size, tokens/s
    and ms/token of the low-bit and the fp model."""
    low, fp = bench_result["lowbit"]["decode"], bench_result["dense"]["decode"]
    return [{"batch": int(b), "lowbit_tok_s": low[b]["tokens_per_s"], "fp_tok_s": fp[b]["tokens_per_s"],
             "lowbit_ms_per_token": 1000 / low[b]["tokens_per_s"], "fp_ms_per_token": 1000 / fp[b]["tokens_per_s"]}
            for b in low if b in fp]


def accuracy_rows(eval_result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The accuracy chart's rows from an evaluation result (``eval.json``): one per task or group, its
    numeric figures (MMLU's 57 subjects are in eval.json and MLflow, not the chart)."""
    rows = (eval_result.get("groups") or {}) | {t: m for t, m in (eval_result.get("tasks") or {}).items()
                                                if not t.startswith("mmlu_")}
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in rows.items()}


def baseline_rows(figures: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per task and metric scored on all three models (``delta.*`` figures present): the three
    values, quantization cost (untuned − fp), tuning gain (merged − untuned), the merged model's stderr."""
    rows = []
    for name, cost in sorted(figures.items()):
        if not name.startswith("delta.quantization."):
            continue
        rest = name[len("delta.quantization."):]
        task, _, metric = rest.rpartition(".")
        rows.append({"task": task, "metric": metric, **{label: figures.get(f"{prefix}.{rest}") for label, prefix in MODELS},
                     "quantization cost": cost, "tuning gain": figures.get(f"delta.tuning.{rest}"),
                     "stderr": figures.get(f"eval.{rest}_stderr")})
    return rows


def per_subject(figure: str) -> bool:
    """An MMLU-subject figure (``eval.mmlu_anatomy.acc``): kept in eval.json and MLflow, not the report."""
    head, _, rest = figure.partition(".")
    return head in {prefix for _, prefix in MODELS} and is_mmlu_subject(rest.rpartition(".")[0])


# ----------------------------------------------------------------------------- formatting

def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if value else "—"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


