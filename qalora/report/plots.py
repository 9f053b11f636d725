"""The run report's PNG plots: matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so no
global backend state is touched and it is safe in worker threads. Each ``plot_*`` returns whether it drew
(False: no data in this run)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qalora.report.rows import MODELS, baseline_rows, fmt, num

PLOTS = {"loss": "loss.png", "latency": "latency.png", "accuracy": "accuracy.png", "baselines": "baselines.png",
         "merge_error": "merge_error.png"}


# ----------------------------------------------------------------------------- plots

def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _grouped_bars(ax, series: Mapping[str, list[float | None]], errors: Mapping[str, list[float]] | None = None,
                  missing: float = math.nan) -> list:
    """One bar per series in each group, groups at x = 0, 1, ... (a missing value draws ``missing``);
    ``errors``: error bars per series. Returns each series' bar container."""
    n, width = len(series), 0.8 / len(series)
    containers = []
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(values))]
        kw = {"yerr": errors[label], "capsize": 3} if errors else {}
        containers.append(ax.bar(xs, [missing if v is None else v for v in values], width, label=label, **kw))
    return containers


def plot_loss(path: Path, loss_curve: list[Mapping[str, Any]]) -> bool:
    points = [(int(r["step"]), num(r.get("loss"))) for r in loss_curve or [] if isinstance(r, Mapping) and "step" in r]
    points = [(s, v) for s, v in points if v is not None]
    if not points:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    steps, losses = zip(*sorted(points))
    ax.plot(steps, losses, marker="o" if len(points) <= 50 else None, markersize=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("QA-LoRA tuning loss")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return True


def plot_latency(path: Path, latency: list[Mapping[str, Any]]) -> bool:
    rows = sorted((r for r in latency or [] if isinstance(r, Mapping) and "batch" in r), key=lambda r: r["batch"])
    series = {label: [num(r.get(key)) for r in rows]
              for key, label in (("lowbit_tok_s", "low-bit"), ("fp_tok_s", "fp reference"))}
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not rows or not series:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    for bars, values in zip(_grouped_bars(ax, series, missing=0.0), series.values()):
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), [str(r["batch"]) for r in rows])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode throughput, same run: low-bit vs fp")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return True


def plot_accuracy(path: Path, accuracy: Mapping[str, Mapping[str, Any]]) -> bool:
    metrics = ("acc", "acc_norm")
    tasks = sorted(t for t, m in (accuracy or {}).items()
                   if isinstance(m, Mapping) and any(num(m.get(k)) is not None for k in metrics))
    if not tasks:
        return False
    present = [k for k in metrics if any(num(accuracy[t].get(k)) is not None for t in tasks)]
    fig = _figure(max(6.0, 1.0 + 0.9 * len(tasks)), 4.0)
    ax = fig.add_subplot()
    _grouped_bars(ax, {k: [num(accuracy[t].get(k)) for t in tasks] for k in present},
                  errors={k: [num(accuracy[t].get(f"{k}_stderr")) or 0.0 for t in tasks] for k in present})
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (± stderr)")
    ax.set_title("Evaluation accuracy by task (merged low-bit model)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return True


def plot_baselines(path: Path, figures: Mapping[str, float]) -> bool:
    """fp, untuned quantized and merged side by side per task: accuracy (acc) and perplexity panels."""
    rows = baseline_rows(figures)
    panels = [(m, [r for r in rows if r["metric"] == m]) for m in ("acc", "perplexity")]
    panels = [(m, rs) for m, rs in panels if rs]
    if not panels:
        return False
    width_in = max(6.0, 1.5 + sum(1.0 * len(rs) for _, rs in panels))
    fig = _figure(width_in, 4.0)
    for k, (metric, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        _grouped_bars(ax, {label: [num(r[label]) for r in rs] for label, _ in MODELS})
        ax.set_xticks(range(len(rs)), [r["task"] for r in rs], rotation=30, ha="right")
        ax.set_ylabel("accuracy" if metric == "acc" else "perplexity (lower is better)")
        ax.grid(axis="y", alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    fig.suptitle("What quantization cost and tuning bought (same questions)")
    fig.savefig(path)
    return True


def _merge_error_rows(summary: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(label, value, tolerance) pairs: errors and their bounds, from the check report or the figures."""
    figures = summary.get("figures") or {}
    checks = (summary.get("check") or {}).get("checks") or {}
    logits, deploy = checks.get("logits") or {}, checks.get("deploy") or {}
    rows = []
    rel = num(logits.get("max_rel_error", figures.get("check.logits.max_rel_error")))
    tol = num(logits.get("rel_tol", figures.get("check.logits.rel_tol")))
    if rel is not None and tol is not None:
        rows.append(("logits: max rel. L2 error", rel, tol))
    dep = num(deploy.get("max_error_over_bound", figures.get("check.deploy.max_error_over_bound")))
    if dep is not None:
        rows.append(("deploy: error / (D_in·eps) bound", dep, 1.0))
    return rows


def plot_merge_error(path: Path, summary: Mapping[str, Any]) -> bool:
    rows = _merge_error_rows(summary)
    shift = num((summary.get("figures") or {}).get("merge.max_abs_zero_shift"))
    if not rows and shift is None:
        return False
    fig = _figure(8.0 if shift is not None and rows else 6.0, 4.0)
    axes = fig.subplots(1, 2 if (rows and shift is not None) else 1, squeeze=False)[0]
    if rows:
        ax = axes[0]
        floor = 1e-12
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [max(r[1], floor) for r in rows], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="tolerance", color="#bbbbbb")
        for x, (_, v, t) in zip(xs, rows):
            ax.annotate(fmt(v), (x - 0.2, max(v, floor)), ha="center", va="bottom", fontsize=8,
                        color="#176b2c" if v <= t else "#b00020")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
        ax.set_title("Merge error vs tolerance (log)")
        ax.legend(fontsize=8)
    if shift is not None:
        ax = axes[-1]
        bars = ax.bar(["max |zero shift|"], [shift], color="#6a51a3")
        ax.bar_label(bars, labels=[fmt(shift)], fontsize=8)
        ax.set_ylabel("quantization steps")
        ax.set_title("Adapter folded into zeros")
    fig.savefig(path)
    return True

