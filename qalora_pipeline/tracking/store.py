"""Where MLflow writes, and how our values become its params, metrics and tags.

``configure`` points tracking and the registry at ``tracking.tracking_uri`` or the default sqlite
store under ``$QALORA_HOME/mlflow``; call it first in the process (the registry functions use the URI
it sets). Every call goes through ``MlflowClient`` with explicit run ids (no fluent active-run stack),
so it is safe from Prefect worker threads.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from qalora.config import TrackingParams
from qalora.paths import state_dir

MAX_TAG = 5000  # characters of a tag value


def default_uri() -> tuple[str, str]:
    """(sqlite tracking URI, artifact root URI) under ``$QALORA_HOME/mlflow``."""
    root = state_dir() / "mlflow"
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def configure(tracking: TrackingParams) -> str:
    """Point MLflow (tracking and registry) at ``tracking.tracking_uri`` or the default sqlite store, and
    make sure the experiment exists (with the default artifact root when we created the store). Returns the URI."""
    if tracking.tracking_uri:
        uri, artifact_location = tracking.tracking_uri, None
    else:
        uri, artifact_location = default_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        try:
            client.create_experiment(tracking.experiment, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a concurrent run
            if client.get_experiment_by_name(tracking.experiment) is None:
                raise
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    # The active experiment: MLflow puts logged models there (else in "Default", whose artifacts go to ./mlruns).
    mlflow.set_experiment(tracking.experiment)
    return uri


def _client() -> MlflowClient:
    return MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri())


# ----------------------------------------------------------------------------- flattening helpers

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys; lists stay values (rendered as JSON by callers)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = obj
    return out


def _text(value: Any, limit: int) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _metric_value(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """``lineage.<key>`` per entry (package versions as ``lineage.versions.<pkg>``), the whole as JSON,
    and MLflow's own git-commit tag."""
    tags = {f"lineage.{k}": _text(v, MAX_TAG) for k, v in flatten(dict(lineage)).items()}
    tags["lineage"] = _text(dict(lineage), MAX_TAG)
    if lineage.get("git_sha"):
        tags[MLFLOW_GIT_COMMIT] = str(lineage["git_sha"])
    return tags



def version_lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """The lineage on a model version: the whole as JSON in ``lineage``, each scalar as ``lineage.<key>``
    (nested entries such as package versions only in the JSON and on the run)."""
    tags = {f"lineage.{k}": _text(v, MAX_TAG) for k, v in lineage.items() if not isinstance(v, Mapping)}
    tags["lineage"] = _text(dict(lineage), MAX_TAG)
    return tags


def _read_artifact(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    """A run artifact's bytes, or None when the run has no such file."""
    folder, _, _ = path.rpartition("/")
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
