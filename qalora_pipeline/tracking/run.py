"""One MLflow parent run per pipeline run: every param (dotted keys), lineage tags, one nested run per
stage (its metrics also on the parent as ``<stage>.<metric>``), DVC-pinned dataset inputs, artifacts;
the run ends FAILED (tag ``qalora.error``) when the pipeline raises. One lock per pipeline run
serialises writes to the sqlite store."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from qalora.config import Params, TrackingParams
from qalora_pipeline.tracking.store import MAX_TAG, _metric_value, _text, configure, flatten, lineage_tags

_BATCH = 100  # MLflow's limit of params/tags per log_batch call
_MAX_PARAM = 6000


class PipelineRun:
    """Handle of the parent run; every method logs by run id and is thread-safe."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.stage_runs: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- low-level batches
    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, _text(v, _MAX_PARAM)) for k, v in flatten(dict(params)).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> list[str]:
        now = int(time.time() * 1000)
        items, skipped = [], []
        for k, v in metrics.items():
            f = _metric_value(v)
            if f is None:
                skipped.append(k)
            else:
                items.append(Metric(k, f, now, step))
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])
        return skipped

    def _log_series(self, run_id: str, key: str, points: list[tuple[int, float]]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(s)) for s, v in points if _metric_value(v) is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def _log_paths(self, run_id: str, paths: list[str | Path], artifact_path: str | None) -> None:
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), f"{artifact_path}/{p.name}" if artifact_path else p.name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)
            else:
                raise FileNotFoundError(f"artifact to log does not exist: {p}")

    # -- public
    def log_stage(
        self,
        stage: str,
        metrics: Mapping[str, float],
        artifacts: list[Path] | None = None,
        params: Mapping[str, Any] | None = None,
        series: Mapping[str, list[tuple[int, float]]] | None = None,
    ) -> str:
        """A nested run named ``stage`` with the metrics, params and artifacts; the metrics also go on the
        parent as ``<stage>.<metric>``. ``series`` = {metric: [(step, value), ...]} (e.g. the loss curve)
        is logged stepwise on both. Non-numeric metric values are skipped (tagged ``skipped_metrics``).
        Returns the nested run's id."""
        with self._lock:
            child = self.client.create_run(
                self.experiment_id, run_name=stage,
                tags={MLFLOW_PARENT_RUN_ID: self.run_id, "qalora.stage": stage},
            ).info.run_id
            try:
                own = {k.removeprefix(f"{stage}."): v for k, v in (metrics or {}).items()}
                skipped = self._log_metrics(child, own)
                self._log_metrics(self.run_id, {f"{stage}.{k}": v for k, v in own.items()})
                if params:
                    self._log_params(child, params)
                for key, points in (series or {}).items():
                    self._log_series(child, key, list(points))
                    self._log_series(self.run_id, f"{stage}.{key}", list(points))
                if artifacts:
                    self._log_paths(child, list(artifacts), None)
                if skipped:
                    self.client.set_tag(child, "skipped_metrics", _text(skipped, MAX_TAG))
            except BaseException:
                self.client.set_terminated(child, "FAILED")
                raise
            self.client.set_terminated(child, "FINISHED")
            self.stage_runs[stage] = child
            return child

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics on the parent run under their own names (non-numeric values skipped)."""
        with self._lock:
            self._log_metrics(self.run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._lock:
            items = [RunTag(k, _text(v, MAX_TAG)) for k, v in tags.items()]
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_dataset(self, name: str, path: str, md5: str, context: str) -> None:
        """Record a dataset input whose MLflow digest is its DVC md5 (``<md5>`` or ``<md5>.dir``)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        if not md5 or len(md5) > 36:
            raise ValueError(f"dataset {name}: digest {md5!r} is not a DVC md5 (MLflow keeps at most 36 characters)")
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(path).resolve()))
        dataset = MetaDataset(source=source, name=name, digest=md5)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("dvc.md5", md5),
                InputTag("path", _text(str(path), 500))]
        with self._lock:
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file of ``folder`` under ``artifact_path`` of the parent run."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"artifact folder does not exist: {folder}")
        with self._lock:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        with self._lock:
            self.client.log_dict(self.run_id, obj, artifact_file)


@contextlib.contextmanager
def pipeline_run(tracking: TrackingParams, run_name: str, params: Params | Mapping[str, Any],
                 lineage: Mapping[str, Any]) -> Iterator[PipelineRun]:
    """The parent run of one pipeline run: all params as dotted keys, lineage tags. Ends FINISHED, or
    FAILED (KILLED on Ctrl-C) with the error in tag ``qalora.error`` when the block raises."""
    uri = configure(tracking)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    tags = {**lineage_tags(lineage), "qalora.kind": "pipeline"}
    if "seed" in lineage:
        tags["seed"] = str(lineage["seed"])
    run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
    handle = PipelineRun(client, run.info.run_id, exp.experiment_id)
    try:
        raw = params.model_dump(mode="json") if hasattr(params, "model_dump") else dict(params)
        handle._log_params(run.info.run_id, raw)
        yield handle
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            client.set_tag(run.info.run_id, "qalora.error", _text(f"{type(e).__name__}: {e}", MAX_TAG))
        client.set_terminated(run.info.run_id, status)
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
