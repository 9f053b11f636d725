"""The accuracy report of a sweep (``reports/accuracy.md`` + ``.png``), from variant records alone.

A record is what :func:`qalora_pipeline.tracking.sweep.variant_records` reads back from MLflow::

    {"method": "qalora", "bits": 4, "group_size": 64, "metrics": {"mmlu/acc": 0.27, ...},
     "answers": {<task>: {"docs": {doc_id: [correct, hash]}, ...}}}

Accuracy is ``acc`` for every task; a task's stderr is lm-eval's. The commonsense average is the mean of
the seven tasks' accuracies (stderr: the root of the summed variances over 7). Methods are compared on
the questions both answered with the exact two-sided McNemar test (:mod:`qalora.paired`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qalora.paired import compare, gated_correctness, two_sided_p
from qalora.report.rows import fmt

COMMONSENSE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
LABELS = {"fp": "fp model (no tuning)", "lora_fp": "LoRA on fp (no quantization)", "gptq": "GPTQ alone",
          "qlora_gptq": "QLoRA (NF4) → GPTQ", "qalora": "QA-LoRA"}
ORDER = ("fp", "lora_fp", "gptq", "qlora_gptq", "qalora")
ALPHA = 0.05  # a difference is marked significant at two-sided p < ALPHA


def _acc(metrics: Mapping[str, float], task: str) -> tuple[float | None, float | None]:
    return metrics.get(f"{task}/acc"), metrics.get(f"{task}/acc_stderr")


def commonsense_average(metrics: Mapping[str, float]) -> tuple[float | None, float | None]:
    """(mean acc of the seven tasks, its stderr); None when a task is missing."""
    pairs = [_acc(metrics, t) for t in COMMONSENSE]
    if any(a is None or s is None for a, s in pairs):
        return None, None
    return sum(a for a, _ in pairs) / len(pairs), math.sqrt(sum(s * s for _, s in pairs)) / len(pairs)


def _pm(value: float | None, stderr: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}" if stderr is not None else f"{value:.{digits}f}"


def _sort_key(r: Mapping[str, Any]) -> tuple:
    quantized = r["bits"] is not None
    return (quantized, -(r["group_size"] or 0), -(r["bits"] or 0), ORDER.index(r["method"]))


def _setting(r: Mapping[str, Any]) -> str:
    return "–" if r["bits"] is None else f"int{r['bits']}.g{r['group_size']}"


def table_rows(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per variant: method, setting, MMLU, the seven tasks, their average, wiki ppl, params, time."""
    rows = []
    for r in sorted(records, key=_sort_key):
        m = r["metrics"]
        rows.append([LABELS.get(r["method"], r["method"]), _setting(r), _pm(*_acc(m, "mmlu")),
                     *(_pm(*_acc(m, t), digits=2) for t in COMMONSENSE), _pm(*commonsense_average(m)),
                     fmt(m.get("wiki_ppl/perplexity")), fmt(m.get("trainable_params", 0)),
                     fmt(m.get("tune_seconds", 0))])
    return rows


def _correct(record: Mapping[str, Any], which: str) -> dict[str, int]:
    patterns = {"all": ["*"], "mmlu": ["mmlu"], "commonsense": list(COMMONSENSE)}[which]
    return gated_correctness(record["answers"], patterns)


def paired_rows(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """QA-LoRA against each other method at the same bits and group, on the questions both answered:
    all, MMLU only, commonsense only; ``*`` marks p < ALPHA (two-sided exact McNemar)."""
    by = {(r["method"], r["bits"], r["group_size"]): r for r in records}
    fp_ref = by.get(("lora_fp", None, None))
    rows = []
    for (method, bits, group), ours in sorted(by.items(), key=lambda kv: _sort_key(kv[1])):
        if method != "qalora":
            continue
        others = [by.get((m, bits, group)) for m in ("gptq", "qlora_gptq")] + [fp_ref]
        for other in filter(None, others):
            cells = []
            for which in ("all", "mmlu", "commonsense"):
                a, b = _correct(other, which), _correct(ours, which)
                if not set(a) & set(b):
                    cells.append("–")
                    continue
                c = compare(a, b)
                p = two_sided_p(c.only_champion, c.only_challenger)
                mark = "*" if p < ALPHA else ""
                cells.append(f"{c.delta:+.3f}{mark} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] p={p:.3g} (n={c.n})")
            rows.append([f"int{bits}.g{group}", f"QA-LoRA − {LABELS[other['method']]}", *cells])
    return rows


def plot_sweep(path: Path, records: Sequence[Mapping[str, Any]]) -> bool:
    """Accuracy over all questions and wiki perplexity per method, by setting; fp references as lines."""
    from qalora.report.plots import _figure, _grouped_bars

    quantized = sorted((r for r in records if r["bits"] is not None), key=_sort_key)
    settings = list(dict.fromkeys(_setting(r) for r in quantized))
    if not settings:
        return False
    by = {(r["method"], _setting(r)): r for r in quantized}
    methods = [m for m in ORDER if any((m, s) in by for s in settings)]

    def overall(r: Mapping[str, Any] | None) -> tuple[float | None, float]:
        if r is None:
            return None, 0.0
        c = _correct(r, "all")
        if not c:
            return None, 0.0
        p = sum(c.values()) / len(c)
        return p, math.sqrt(p * (1 - p) / len(c))

    fig = _figure(11, 4.2)
    ax_acc, ax_ppl = fig.subplots(1, 2)
    accs = {LABELS[m]: [overall(by.get((m, s))) for s in settings] for m in methods}
    _grouped_bars(ax_acc, {k: [v for v, _ in vals] for k, vals in accs.items()},
                  errors={k: [e for _, e in vals] for k, vals in accs.items()})
    ppls = {LABELS[m]: [(by.get((m, s)) or {}).get("metrics", {}).get("wiki_ppl/perplexity") for s in settings]
            for m in methods}
    _grouped_bars(ax_ppl, ppls)
    for r in records:
        if r["bits"] is None:
            acc, _ = overall(r)
            if acc is not None:
                ax_acc.axhline(acc, ls="--", lw=1, color="k" if r["method"] == "fp" else "grey",
                               label=LABELS[r["method"]])
            if (ppl := r["metrics"].get("wiki_ppl/perplexity")) is not None:
                ax_ppl.axhline(ppl, ls="--", lw=1, color="k" if r["method"] == "fp" else "grey")
    for ax, title in ((ax_acc, "accuracy, all questions (± stderr)"), (ax_ppl, "wiki perplexity (log)")):
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(title)
    ax_ppl.set_yscale("log")
    ax_acc.legend(fontsize=7)
    fig.savefig(path)
    return True


def _settings(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """How the variants were made: each run's ``setting.*`` params (from its sweep's params); a setting the
    runs disagree on lists every value."""
    out: dict[str, list[str]] = {}
    for r in records:
        for k, v in (r.get("params") or {}).items():
            if k.startswith("setting.") and v not in out.setdefault(k.removeprefix("setting."), []):
                out[k.removeprefix("setting.")].append(v)
    return {k: " / ".join(v) for k, v in out.items()}


def accuracy_blocks(records: Sequence[Mapping[str, Any]], image: str) -> list[tuple]:
    """The report as blocks (:func:`qalora.report._md`): settings, the table, the paired comparisons, the plot."""
    header = ["method", "setting", "MMLU 5-shot", *COMMONSENSE, "commonsense avg", "wiki ppl",
              "learnable params", "tune s"]
    n = {r["method"] + _setting(r): len(_correct(r, "all")) for r in records}
    blocks: list[tuple] = [
        ("h", 1, "Accuracy: QA-LoRA against QLoRA → GPTQ, GPTQ alone and LoRA on the fp model"),
        ("p", "Generated by `qalora sweep` from the sweep's MLflow runs alone (one run per variant). "
              + "; ".join(f"{k}: {v}" for k, v in _settings(records).items()) + "."),
        ("p", f"{len(records)} variants; questions per variant: {sorted(set(n.values()))}. Accuracy is lm-eval's "
              "`acc` ± its stderr. Perplexity has no stderr here (one figure over the held-out windows)."),
        ("table", header, table_rows(records)),
        ("h", 2, "Paired comparisons (same questions)"),
        ("p", f"QA-LoRA minus the other method, in accuracy over the questions both answered, with its 95% "
              f"interval and the exact two-sided McNemar p-value; `*` = p < {ALPHA} (not corrected for the "
              "number of comparisons in this table)."),
        ("table", ["setting", "comparison", "all questions", "MMLU", "commonsense"], paired_rows(records)),
    ]
    if image:
        blocks.append(("img", image, "accuracy and perplexity by method and setting"))
    return blocks


def write_accuracy_report(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``path`` (markdown) and its plot next to it (same name, .png); returns ``path``."""
    from qalora.report import _md

    if not records:
        raise ValueError("no sweep runs to report: run `qalora sweep` first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = path.with_suffix(".png")
    drew = plot_sweep(image, records)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(_md(accuracy_blocks(records, image.name if drew else "")))
    tmp.replace(path)  # never a half-written report under the real name
    return path
