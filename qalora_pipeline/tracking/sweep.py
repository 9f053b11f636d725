"""The accuracy sweep in MLflow: one run per variant (method x bits x group) in the sweep's experiment, and
the records the accuracy report is built from, read back from those runs alone.

A variant's run carries tags ``qalora.sweep`` (the params' name), ``method``, ``bits``, ``group_size`` and
``qalora.variant_key`` (its evaluation stage's content key), its figures as metrics, and the per-question
answers as the artifact ``answers.json``. A re-run whose stages all came from the cache finds the run of
the same key and logs nothing new; a changed stage (code, data, params) logs a new run, and the report
takes each variant's newest.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from qalora.config import TrackingParams
from qalora_pipeline.tracking.store import MAX_TAG, _metric_value, _text, configure

KIND = "sweep"
ANSWERS = "answers.json"


def _experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"MLflow experiment {name!r} does not exist: run `qalora sweep` first")
    return exp.experiment_id


def log_variant(tracking: TrackingParams, experiment: str, sweep: str, variant: Mapping[str, Any], key: str,
                metrics: Mapping[str, float], answers: Mapping[str, Any] | None, params: Mapping[str, Any]) -> tuple[str, bool]:
    """Log one variant's run (unless the run of ``key`` exists). Returns (run id, newly logged)."""
    uri = configure(tracking.model_copy(update={"experiment": experiment}))
    client = MlflowClient(uri, uri)
    exp_id = _experiment(client, experiment)
    found = client.search_runs([exp_id], f"tags.`qalora.variant_key` = '{key}' and tags.`qalora.sweep` = '{sweep}'",
                               max_results=1)
    if found:
        return found[0].info.run_id, False
    tags = {"qalora.kind": KIND, "qalora.sweep": sweep, "qalora.variant_key": key,
            **{k: str(v) for k, v in variant.items()}}
    name = ".".join(str(variant[k]) for k in ("method", "bits", "group_size") if variant.get(k) is not None)
    run = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    try:
        for k, v in params.items():
            client.log_param(run, k, _text(v, MAX_TAG))
        for k, v in metrics.items():
            if (f := _metric_value(v)) is not None:
                client.log_metric(run, k, f)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ANSWERS).write_text(json.dumps(answers or {}))
            client.log_artifact(run, str(Path(tmp) / ANSWERS))
    except BaseException:
        client.set_terminated(run, "FAILED")
        raise
    client.set_terminated(run, "FINISHED")
    return run, True


def variant_records(tracking: TrackingParams, experiment: str, sweep: str) -> list[dict[str, Any]]:
    """Each variant's newest finished run of ``sweep``: ``{method, bits, group_size, metrics, params, answers,
    run_id}``
    (bits and group_size None for the fp model and LoRA on it)."""
    uri = configure(tracking.model_copy(update={"experiment": experiment}))
    client = MlflowClient(uri, uri)
    runs = client.search_runs([_experiment(client, experiment)],
                              f"tags.`qalora.sweep` = '{sweep}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=10_000)
    records: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        tags = run.data.tags
        ident = (tags.get("method"), tags.get("bits"), tags.get("group_size"))
        if ident in records:  # an older run of a variant logged again since
            continue
        with tempfile.TemporaryDirectory() as tmp:
            answers = json.loads(Path(client.download_artifacts(run.info.run_id, ANSWERS, tmp)).read_text())
        records[ident] = {"method": ident[0], "bits": _int(ident[1]), "group_size": _int(ident[2]),
                          "metrics": dict(run.data.metrics), "params": dict(run.data.params), "answers": answers,
                          "run_id": run.info.run_id}
    return list(records.values())


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "None") else None
