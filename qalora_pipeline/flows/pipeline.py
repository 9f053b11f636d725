"""The qalora pipeline: DVC-verified data -> quantize -> tune -> merge -> check -> benchmark ->
evaluate -> gate/registry -> report, as one Prefect flow tracked as one MLflow run.

Stages pass folder paths and content keys, never tensors; each stage folder is content-addressed
(qalora_pipeline/tasks/stage_cache.py), so a re-run skips finished stages and resumes an interrupted
tune. This file is also the Prefect deployment entrypoint (prefect.yaml).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qalora import numerics

# Before torch runs (a Prefect worker imports this module first): see qalora/numerics.py.
numerics.pin()

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from qalora import report  # noqa: E402
from qalora.bench import RESULT as BENCH_RESULT  # noqa: E402
from qalora.check import REPORT as CHECK_REPORT  # noqa: E402
from qalora.config import Params, load_params  # noqa: E402
from qalora.evaluate import RESULT as EVAL_RESULT  # noqa: E402
from qalora.export import REPORT as EXPORT_REPORT  # noqa: E402
from qalora.figures import EVALUATIONS, baseline_deltas, run_figures  # noqa: E402
from qalora.manifest import code_version, git_state, package_versions, read_json, sha256_bytes  # noqa: E402
from qalora.model_io import source_identity  # noqa: E402
from qalora.paths import resolve_model, resolve_path, state_dir  # noqa: E402
from qalora_pipeline import data_version, tracking  # noqa: E402
from qalora_pipeline.tasks.benchmark import benchmark_task  # noqa: E402
from qalora_pipeline.tasks.check import check_task  # noqa: E402
from qalora_pipeline.tasks.evaluate import evaluate_task  # noqa: E402
from qalora_pipeline.tasks.export import export_task  # noqa: E402
from qalora_pipeline.tasks.merge import merge_task  # noqa: E402
from qalora_pipeline.tasks.quantize import quantize_task  # noqa: E402
from qalora_pipeline.tasks.stage_cache import StageResult  # noqa: E402
from qalora_pipeline.tasks.tune import tune_task  # noqa: E402


def params_hash(p: Params) -> str:
    return sha256_bytes(p.model_dump_json().encode())


def lineage_of(p: Params, data_md5: str) -> dict[str, Any]:
    git = git_state()
    return {"git_sha": git["sha"], "git_dirty": git["dirty"], "data_md5": data_md5,
            "params_hash": params_hash(p), "code_version": code_version(), "seed": p.tune.seed,
            "versions": package_versions(), "numerics": numerics.describe()}


def same_build(lineage: dict[str, Any], champion: dict[str, Any] | None) -> bool:
    """A scheduled run is redundant when data, code and params all equal the champion's."""
    if not champion:
        return False
    theirs = champion.get("lineage") or {}
    return all(str(theirs.get(k)) == str(lineage[k]) for k in ("data_md5", "code_version", "params_hash"))


def _history(adapter: StageResult) -> list[dict[str, float]]:
    lines = (Path(adapter.dir) / "metrics.jsonl").read_text().splitlines()
    return [{"step": r["step"], "loss": r["loss"]} for r in map(json.loads, lines)]


def source_stage(p: Params) -> StageResult:
    """The full-precision source model as a stage input (its content hash is its key)."""
    source = resolve_model(p.model.source)
    return StageResult("source", source, source_identity(source), cached=True)


def build_summary(run_name: str, lineage: dict, stages: dict[str, StageResult], extra: dict[str, Any]) -> dict[str, Any]:
    figures = run_figures({name: res.metrics for name, res in stages.items()})  # each figure once, by its name
    figures |= baseline_deltas(figures)  # what quantization cost, what tuning bought (with baselines)
    check = read_json(Path(stages["check"].dir) / CHECK_REPORT, "check report")
    return {
        "run_name": run_name, "figures": figures, "loss_curve": _history(stages["tune"]),
        "latency": extra.get("latency", []), "accuracy": extra.get("accuracy", {}), "check": check,
        "lineage": lineage, "paths": {name: res.dir for name, res in stages.items()}
        | {"check_json": str(Path(stages["check"].dir) / CHECK_REPORT)},
    }




@flow(name="qalora-pipeline", log_prints=True)
def qalora_pipeline(
    params_file: str | None = "params/default.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    scheduled: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline for one params file; returns the decision and the report path."""
    log = get_run_logger()
    numerics.activate()
    p = load_params(params_file, overrides)
    root = Path(project_dir).resolve()
    data_md5 = data_version.verify(root)
    lineage = lineage_of(p, data_md5)
    tracking.configure(p.tracking)
    champion = tracking.champion(p.tracking.registered_model)
    if scheduled and same_build(lineage, champion):
        msg = (f"skipped: data ({data_md5}), code and params equal champion v{champion['version']}'s; "
               "nothing to retrain")
        print(msg)
        create_markdown_artifact(key="qalora-run", description="qalora run skipped", markdown=f"**{msg}**\n")
        return {"skipped": True, "message": msg, "champion": champion["version"]}

    with state_lock():
        return _train_and_gate(p, root, data_md5, lineage, log)


def _export(p: Params, merged: StageResult, run) -> dict[str, Any]:
    """Export the merged model to each of ``export.formats``; each export's folder goes to the MLflow run
    under ``exports/<format>``, so the champion's run carries them. Returns ``{format: export report}``."""
    reports = {}
    for fmt in p.export.formats:
        res = export_task(p, merged, fmt)
        run.log_stage(f"export-{fmt}", res.metrics | {"cached": float(res.cached)},
                      artifacts=[Path(res.dir) / EXPORT_REPORT])
        run.log_artifacts(res.dir, f"exports/{fmt}")
        reports[fmt] = read_json(Path(res.dir) / EXPORT_REPORT, "export report")
    return reports


@contextlib.contextmanager
def state_lock() -> Iterator[None]:
    """One training run at a time on a state dir: a second one (a scheduled run still going when the next
    is due, or a manual `qalora run` meanwhile) fails at once, touching nothing, instead of racing."""
    path = state_dir() / "pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"another pipeline run is training on {state_dir()} ({f.read().strip() or 'holder unknown'}); "
                               "this run stops without touching it") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def _train_and_gate(p: Params, root: Path, data_md5: str, lineage: dict[str, Any], log) -> dict[str, Any]:
    run_name = f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = {k: resolve_path(getattr(p.data, k), root) for k in ("train", "calibration", "heldout", "eval_dir")}
    with tracking.pipeline_run(p.tracking, run_name, p, lineage) as run:
        run.log_dict(p.model_dump(mode="json"), "lineage/params.json")  # what `qalora rebuild` re-runs
        run.log_dict(lineage, "lineage/lineage.json")
        for name, ctx in (("train", "training"), ("calibration", "calibration"), ("heldout", "evaluation"),
                          ("eval_dir", "evaluation")):
            run.log_dataset(name, str(paths[name]), data_md5, ctx)
        stages: dict[str, StageResult] = {}
        source = source_stage(p)  # hashed once: quantize's key and the fp baseline's
        stages["quantize"] = quantize_task(p, paths["calibration"], source)
        stages["tune"] = tune_task(p, stages["quantize"], paths["train"])
        stages["merge"] = merge_task(stages["quantize"], stages["tune"])
        stages["check"] = check_task(p, stages["quantize"], stages["tune"], stages["merge"])
        extra: dict[str, Any] = {}
        answers = None
        if p.benchmark.enabled:
            stages["benchmark"] = benchmark_task(p, stages["merge"])
            extra["latency"] = report.latency_rows(read_json(Path(stages["benchmark"].dir) / BENCH_RESULT,
                                                             "benchmark result"))
        if p.evaluate.enabled:
            stages["evaluate"] = evaluate_task(p, stages["merge"], paths["eval_dir"], paths["heldout"], data_md5)
            evaluated = read_json(Path(stages["evaluate"].dir) / EVAL_RESULT, "eval result")
            extra["accuracy"] = report.accuracy_rows(evaluated)
            answers = evaluated.get("answers")  # per question: what the paired no-regression rule compares
            for variant in p.evaluate.baselines:  # the same questions for the fp source and the untuned base
                model = stages["quantize"] if variant == "base" else source
                stages[EVALUATIONS[variant]] = evaluate_task(p, model, paths["eval_dir"], paths["heldout"],
                                                             data_md5, variant)
        # Exports before registration: a model a format cannot hold fails the run before it can be promoted
        # (a champion without its requested export would be worse than no promotion).
        exports = _export(p, stages["merge"], run)
        summary = build_summary(run_name, lineage, stages, extra) | {"exports": exports}
        for name, res in stages.items():
            series = {"loss": [(r["step"], r["loss"]) for r in summary["loss_curve"]]} if name == "tune" else None
            run.log_stage(name, res.metrics | {"cached": float(res.cached)},
                          artifacts=[f for f in Path(res.dir).glob("*.json")], series=series)
        run.log_metrics({k: v for k, v in summary["figures"].items() if k.startswith("delta.")})

        # Decided against the champion of the moment the registry is locked, not the one seen at the start.
        registered = tracking.register_and_gate(run.run_id, Path(stages["merge"].dir), p.tracking.registered_model,
                                                p.gate, summary["figures"], lineage, answers)
        decision = registered["gate"]
        report_dir = root / "reports" / run_name
        report_md = report.write_report(report_dir, summary, decision)  # + summary.json, decision.json
        run.log_artifacts(report_dir, "report")
    verdict = "PROMOTED to champion" if decision["passed"] else "REJECTED"
    lines = [f"gate: {verdict} ({p.tracking.registered_model} v{registered['version']})"]
    lines += [f"  {'ok  ' if r['passed'] else 'FAIL'} {r['rule']}: {r['message']}" for r in decision["rules"]]
    lines.append(f"report: {report_md}")
    decision_text = "\n".join(lines)
    print(decision_text)
    create_markdown_artifact(
        key="qalora-run", description=f"qalora run {run_name}",
        markdown=f"# {run_name}\n\n**{verdict}** — model version {registered['version']}\n\n"
                 + "\n".join(f"- {'✅' if r['passed'] else '❌'} {r['rule']}: {r['message']}" for r in decision["rules"])
                 + f"\n\nReport: `{report_md}`\n",
    )
    log.info("cached stages: %s", [n for n, r in stages.items() if r.cached])
    return {"skipped": False, "run_name": run_name, "passed": decision["passed"], "version": registered["version"],
            "report": str(report_md), "cached": [n for n, r in stages.items() if r.cached], "figures": summary["figures"],
            "message": decision_text}
