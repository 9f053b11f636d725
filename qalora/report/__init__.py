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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qalora.manifest import atomic_output_dir
from qalora.report.plots import (
    PLOTS, plot_accuracy, plot_baselines, plot_latency, plot_loss, plot_merge_error,
)
from qalora.report.rows import MODELS, accuracy_rows, baseline_rows, fmt, latency_rows, per_subject

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
DECISION_JSON = "decision.json"
_OWN_FILES = {REPORT_MD, REPORT_HTML, SUMMARY_JSON, DECISION_JSON, *PLOTS.values()}

__all__ = ["REPORT_MD", "REPORT_HTML", "SUMMARY_JSON", "DECISION_JSON", "PLOTS", "accuracy_rows", "baseline_rows",
           "latency_rows", "write_report"]


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
        shown = {k: v for k, v in figures.items() if not per_subject(k)}
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
