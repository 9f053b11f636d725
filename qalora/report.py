"""Run report: ``report.md`` + ``report.html`` + PNG plots from a pipeline summary and gate decision.

``write_report(folder, summary, decision)`` renders the gate decision (every rule with value,
threshold and pass/fail), what quantization cost and tuning bought (fp, untuned quantized and merged
model on the same questions), every figure but the per-subject MMLU ones, the plots (loss curve,
decode tokens/s by batch low-bit vs fp, accuracy by task, the three models by task, merge error vs
tolerance), the bit-exactness check, lineage and paths.
Every section of ``summary`` is optional: a disabled stage just leaves its plot and table out.
The inputs are saved next to the report as ``summary.json`` and ``decision.json``, so the folder
alone re-renders it.

Plots use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so no global backend
state is touched and it is safe in worker threads. The folder is written atomically (temp folder,
then one rename) and must be a dedicated report folder: replacing a folder holding anything else
is refused.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qalora.figures import is_mmlu_subject
from qalora.manifest import atomic_output_dir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
DECISION_JSON = "decision.json"
PLOTS = {"loss": "loss.png", "latency": "latency.png", "accuracy": "accuracy.png", "baselines": "baselines.png",
         "merge_error": "merge_error.png"}
# The three models a run scores on the same questions: (label, figure prefix).
MODELS = (("fp", "eval_fp"), ("quantized, untuned", "eval_base"), ("merged (tuned)", "eval"))
_OWN_FILES = {REPORT_MD, REPORT_HTML, SUMMARY_JSON, DECISION_JSON, *PLOTS.values()}


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


def _per_subject(figure: str) -> bool:
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


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- document model
# A report is a list of blocks rendered twice (markdown, html): ("h", level, text),
# ("p", text), ("table", header, rows), ("img", file, caption).

def _md(blocks: list[tuple]) -> str:
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "table":
            _, header, rows = b
            out.append("| " + " | ".join(cell(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out).rstrip() + "\n"


def _html(title: str, blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            text = e(b[1])
            while "**" in text:  # the only inline markup we emit
                text = text.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
            body.append(f"<p>{text}</p>")
        elif b[0] == "table":
            _, header, rows = b
            cls = lambda c: ' class="fail"' if c == "FAIL" else (' class="pass"' if c == "pass" else "")  # noqa: E731
            body.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr></thead><tbody>")
            body.extend("<tr>" + "".join(f"<td{cls(c)}>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append("</tbody></table>")
        elif b[0] == "img":
            body.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "td.pass{color:#176b2c}td.fail{color:#b00020;font-weight:bold}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- plots

def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_loss(path: Path, loss_curve: list[Mapping[str, Any]]) -> bool:
    points = [(int(r["step"]), _num(r.get("loss"))) for r in loss_curve or [] if isinstance(r, Mapping) and "step" in r]
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
    series = {label: [_num(r.get(key)) for r in rows]
              for key, label in (("lowbit_tok_s", "low-bit"), ("fp_tok_s", "fp reference"))}
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not rows or not series:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    n, width = len(series), 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
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
                   if isinstance(m, Mapping) and any(_num(m.get(k)) is not None for k in metrics))
    if not tasks:
        return False
    present = [k for k in metrics if any(_num(accuracy[t].get(k)) is not None for t in tasks)]
    fig = _figure(max(6.0, 1.0 + 0.9 * len(tasks)), 4.0)
    ax = fig.add_subplot()
    n, width = len(present), 0.8 / len(present)
    for i, key in enumerate(present):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(tasks))]
        vals = [_num(accuracy[t].get(key)) for t in tasks]
        errs = [_num(accuracy[t].get(f"{key}_stderr")) or 0.0 for t in tasks]
        ax.bar(xs, [v if v is not None else math.nan for v in vals], width, yerr=errs, capsize=3, label=key)
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
        width = 0.8 / len(MODELS)
        for i, (label, _) in enumerate(MODELS):
            xs = [j + (i - 1) * width for j in range(len(rs))]
            values = [_num(r[label]) for r in rs]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, label=label)
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
    rel = _num(logits.get("max_rel_error", figures.get("check.logits.max_rel_error")))
    tol = _num(logits.get("rel_tol", figures.get("check.logits.rel_tol")))
    if rel is not None and tol is not None:
        rows.append(("logits: max rel. L2 error", rel, tol))
    dep = _num(deploy.get("max_error_over_bound", figures.get("check.deploy.max_error_over_bound")))
    if dep is not None:
        rows.append(("deploy: error / (D_in·eps) bound", dep, 1.0))
    return rows


def plot_merge_error(path: Path, summary: Mapping[str, Any]) -> bool:
    rows = _merge_error_rows(summary)
    shift = _num((summary.get("figures") or {}).get("merge.max_abs_zero_shift"))
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


# ----------------------------------------------------------------------------- sections

def _decision_blocks(decision: Mapping[str, Any]) -> list[tuple]:
    rules = decision.get("rules") or []
    passed = bool(decision.get("passed")) and not decision.get("failed")
    verdict = decision.get("decision") or ("promoted" if passed else "rejected")
    text = f"**Gate: {'PASSED' if passed else 'FAILED'}** — {verdict}"
    if decision.get("version") is not None:
        text += f" (registered version {decision['version']}"
        text += f", compared with champion v{decision['compared_with']})" if decision.get("compared_with") else ")"
    if decision.get("failed"):
        text += f". Failed rules: {', '.join(decision['failed'])}"
    blocks = [("h", 2, "Gate decision"), ("p", text + ".")]
    if rules:
        blocks.append(("table", ["rule", "result", "value", "threshold", "message"],
                       [[r.get("rule"), "pass" if r.get("passed") else "FAIL", fmt(r.get("value")),
                         fmt(r.get("threshold")), r.get("message", "")] for r in rules]))
    else:
        blocks.append(("p", "No gate rules were evaluated."))
    return blocks


def _check_blocks(check: Mapping[str, Any]) -> list[tuple]:
    checks = check.get("checks") or {}
    if not checks:
        return []
    rows = []
    for name, c in checks.items():
        details = {k: v for k, v in (c or {}).items() if k != "passed"}
        rows.append([name, "pass" if c.get("passed") else "FAIL",
                     "; ".join(f"{k}={fmt(v)}" for k, v in details.items())])
    verdict = "PASSED" if check.get("passed") else f"FAILED ({', '.join(check.get('failed') or [])})"
    return [("h", 2, "Bit-exactness check"), ("p", f"**{verdict}**"), ("table", ["check", "result", "figures"], rows)]


def _accuracy_blocks(accuracy: Mapping[str, Any]) -> list[tuple]:
    tasks = {t: m for t, m in (accuracy or {}).items() if isinstance(m, Mapping) and m}
    if not tasks:
        return []
    keys = sorted({k for m in tasks.values() for k in m})
    return [("h", 2, "Evaluation"),
            ("table", ["task", *keys], [[t, *(fmt(m.get(k)) for k in keys)] for t, m in sorted(tasks.items())])]


def _baseline_blocks(figures: Mapping[str, float]) -> list[tuple]:
    rows = baseline_rows(figures)
    if not rows:
        return []
    keys = ["task", "metric", *(label for label, _ in MODELS), "quantization cost", "tuning gain", "stderr"]
    return [("h", 2, "What quantization cost and tuning bought"),
            ("p", "The fp source model, the untuned quantized base and the merged model on the same questions. "
                  "Quantization cost = untuned − fp; tuning gain = merged − untuned (accuracy: higher is better; "
                  "perplexity: lower). A difference within about two stderr of the merged model's is noise."),
            ("table", keys, [[fmt(r[k]) for k in keys] for r in rows])]


def _latency_blocks(latency: list[Mapping[str, Any]]) -> list[tuple]:
    rows = [r for r in latency or [] if isinstance(r, Mapping)]
    if not rows:
        return []
    keys = ["batch"] + sorted({k for r in rows for k in r} - {"batch"})
    return [("h", 2, "Latency"), ("table", keys, [[fmt(r.get(k)) for k in keys] for r in rows])]


def _export_blocks(exports: Mapping[str, Any]) -> list[tuple]:
    """One row per export and consumer: the error the format introduces against our fp32-zero model."""
    rows = []
    for fmt_name, rep in sorted((exports or {}).items()):
        steps = (rep.get("weights") or {}).get("max_error_steps")
        for consumer, c in sorted((rep.get("consumers") or {}).items()):
            if "max_rel_error" in c:
                agree = f"{c.get('greedy_identical_prompts')}/{c.get('prompts')}"
                rows.append([fmt_name, rep.get("file"), fmt(steps), consumer, fmt(c["max_rel_error"]), agree])
            else:
                rows.append([fmt_name, rep.get("file"), fmt(steps), consumer, "-", c.get("skipped", "-")])
    if not rows:
        return []
    return [("h", 2, "Exports"),
            ("p", "Weight error in quantization steps of the source model; logits error and greedy agreement "
                  "on the check prompts, each loaded by its consumer."),
            ("table", ["format", "file", "weight error (steps)", "consumer", "logits rel error", "greedy identical"],
             rows)]


def _kv_blocks(title: str, mapping: Mapping[str, Any]) -> list[tuple]:
    if not mapping:
        return []
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return [("h", 2, title), ("table", ["key", "value"], [[k, fmt(v)] for k, v in sorted(flat.items())])]


def _check_folder(folder: Path) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"report folder {folder} is a file")
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise ValueError(f"refusing to replace {folder}: it holds files that are not part of a report "
                             f"({', '.join(foreign[:5])}); give the report its own folder")


def write_report(folder: str | Path, summary: Mapping[str, Any], decision: Mapping[str, Any]) -> Path:
    """Write the report folder atomically; returns the path of ``report.md`` inside it."""
    folder = Path(folder)
    _check_folder(folder)
    summary = summary or {}
    decision = decision or {}
    run_name = summary.get("run_name") or "run"
    figures = summary.get("figures") or {}
    with atomic_output_dir(folder, "report", marker=REPORT_MD) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is for reading
        made = {
            "loss": plot_loss(tmp / PLOTS["loss"], summary.get("loss_curve") or []),
            "latency": plot_latency(tmp / PLOTS["latency"], summary.get("latency") or []),
            "accuracy": plot_accuracy(tmp / PLOTS["accuracy"], summary.get("accuracy") or {}),
            "baselines": plot_baselines(tmp / PLOTS["baselines"], figures),
            "merge_error": plot_merge_error(tmp / PLOTS["merge_error"], summary),
        }
        captions = {"loss": "Tuning loss by step", "latency": "Decode tokens/s by batch size, low-bit vs fp",
                    "accuracy": "Accuracy by task", "baselines": "fp vs untuned quantized vs merged, by task",
                    "merge_error": "Merge error vs tolerance, zero shift"}
        blocks: list[tuple] = [("h", 1, f"qalora run report: {run_name}")]
        blocks += _decision_blocks(decision)
        plots = [("img", PLOTS[k], captions[k]) for k, ok in made.items() if ok]
        skipped = [k for k, ok in made.items() if not ok]
        if plots or skipped:
            blocks.append(("h", 2, "Plots"))
            blocks += plots
            if skipped:
                blocks.append(("p", f"Not plotted (no data in this run): {', '.join(skipped)}."))
        blocks += _baseline_blocks(figures)
        blocks.append(("h", 2, "Figures"))
        shown = {k: v for k, v in figures.items() if not _per_subject(k)}
        if shown:
            blocks.append(("table", ["figure", "value"], [[k, fmt(v)] for k, v in sorted(shown.items())]))
            if len(shown) < len(figures):
                blocks.append(("p", f"{len(figures) - len(shown)} per-subject MMLU figures are in eval.json and on "
                                    "the MLflow run, not here: a few questions each, they are noise one by one."))
        else:
            blocks.append(("p", "No figures were recorded."))
        blocks += _check_blocks(summary.get("check") or {})
        blocks += _accuracy_blocks(summary.get("accuracy") or {})
        blocks += _latency_blocks(summary.get("latency") or [])
        blocks += _export_blocks(summary.get("exports") or {})
        blocks += _kv_blocks("Lineage", summary.get("lineage") or {})
        blocks += _kv_blocks("Paths", summary.get("paths") or {})
        (tmp / REPORT_MD).write_text(_md(blocks), encoding="utf-8")
        (tmp / REPORT_HTML).write_text(_html(f"qalora run report: {run_name}", blocks), encoding="utf-8")
        # The inputs, so `qalora report --run FOLDER` can re-render the report from the folder alone.
        for name, obj in ((SUMMARY_JSON, summary), (DECISION_JSON, decision)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return folder / REPORT_MD
