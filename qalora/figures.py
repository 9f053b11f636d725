"""The run's figures: what the stages measured, as one flat ``{name: float}``, and the names read back.

Each stage folder's manifest holds that stage's ``metrics``: quantize, tune and merge their own;
check :func:`check_figures` of its report; benchmark :func:`bench_figures` of its result; evaluate
the flat ``task/metric`` figures of its lm-eval result. A run's figure name is
``<prefix>.<metric>`` (:func:`run_figures`): the prefix is the stage's name (``eval`` for
evaluate), and ``/`` becomes ``.``. The gate's rules (:mod:`qalora.gate`), the run summary and
report, MLflow and the registry all use these names; the ones a rule reads by name are below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAGE_PREFIX = {"evaluate": "eval", "evaluate_fp": "eval_fp", "evaluate_base": "eval_base"}  # others: own name
# The run's evaluations, by model: the merged one, and the baselines scored on the same questions.
EVALUATIONS = {"merged": "evaluate", "fp": "evaluate_fp", "base": "evaluate_base"}
MMLU_GROUPS = ("mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")
DELTA_METRICS = ("acc", "acc_norm", "perplexity")  # the quality metrics the baseline deltas are taken of

# Figures the gate reads by name.
BIT_EXACT = "check.passed"
LOGIT_ERROR = "check.logits.max_rel_error"
DECODE_SPEEDUP = "benchmark.decode_speedup.b1"


def stage_figures(stage: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """A stage's metrics under the run's figure names."""
    prefix = STAGE_PREFIX.get(stage, stage)
    return {f"{prefix}.{k.replace('/', '.')}": v for k, v in metrics.items()}


def run_figures(stage_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{stage: metrics}`` (in stage order) -> the run's flat figures."""
    out: dict[str, float] = {}
    for stage, metrics in stage_metrics.items():
        out |= stage_figures(stage, metrics)
    return out


def check_figures(report: Mapping[str, Any]) -> dict[str, float]:
    """The check stage's metrics: passed (1/0) and the logit comparison (``check.logits.*`` in the run)."""
    logits = report["checks"]["logits"]
    return {"passed": float(report["passed"]), "logits.max_rel_error": logits["max_rel_error"],
            "logits.max_abs_error": logits["max_abs_error"],
            "logits.greedy_identical_prompts": float(logits["greedy_identical_prompts"])}


def bench_figures(result: Mapping[str, Any]) -> dict[str, float]:
    """The benchmark stage's metrics: decode_tok_s.{lowbit,fp}.b{B}, decode_speedup.b{B},
    prefill_ms.{lowbit,fp}.t{T}."""
    figures: dict[str, float] = {}
    for mode, label in (("lowbit", "lowbit"), ("dense", "fp")):
        for b, r in (result.get(mode) or {}).get("decode", {}).items():
            figures[f"decode_tok_s.{label}.b{b}"] = r["tokens_per_s"]
        for t, ms in (result.get(mode) or {}).get("prefill_ms", {}).items():
            figures[f"prefill_ms.{label}.t{t}"] = ms
    for b, ratio in (result.get("ratio_lowbit_over_dense") or {}).get("decode", {}).items():
        figures[f"decode_speedup.b{b}"] = ratio
    return figures


def is_mmlu_subject(task: str) -> bool:
    """One of MMLU's 57 subjects (a few questions each at CPU-sized limits), not MMLU or a subject group."""
    return task.startswith("mmlu_") and task not in MMLU_GROUPS


def baseline_deltas(figures: Mapping[str, float]) -> dict[str, float]:
    """What quantization cost and tuning bought, for each task and metric all three models have:
    ``delta.quantization.<task>.<metric>`` = untuned quantized base − fp model, ``delta.tuning.<task>.<metric>``
    = merged − untuned base (accuracy: higher is better; perplexity: lower is better). MMLU subjects are left
    out (their groups carry them)."""
    out: dict[str, float] = {}
    for name, merged in figures.items():
        if not name.startswith("eval."):
            continue
        rest = name[len("eval."):]
        task, _, metric = rest.rpartition(".")
        fp, base = figures.get(f"eval_fp.{rest}"), figures.get(f"eval_base.{rest}")
        if metric in DELTA_METRICS and not is_mmlu_subject(task) and fp is not None and base is not None:
            out[f"delta.quantization.{rest}"] = base - fp
            out[f"delta.tuning.{rest}"] = merged - base
    return out
