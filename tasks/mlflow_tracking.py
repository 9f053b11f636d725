"""MLflow tracking and the model registry gate for the qalora pipeline.

* ``configure``         tracking + registry URI (default: sqlite under ``$QALORA_HOME/mlflow``), experiment.
* ``pipeline_run``      one parent run per pipeline run: every param (dotted keys), lineage tags, one nested
                        run per stage (metrics also on the parent as ``<stage>.<metric>``), DVC-pinned
                        dataset inputs, artifacts; ends FAILED on an exception.
* ``register_and_gate`` logs the merged low-bit folder as a pyfunc model ("models from code",
                        tasks/lowbit_pyfunc.py), registers a version, aliases it ``challenger``, tags it
                        with every figure, the lineage and every gate rule, and moves ``champion`` to it
                        when the gate passed (the old champion keeps the ``previous-champion`` alias).
* ``champion``          the current ``@champion`` version's figures and lineage (None when none).
* ``regate``            re-evaluate the gate for a registered version against the current champion.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent active-run stack), so it is
safe from Prefect worker threads; one lock per pipeline run serialises writes to the sqlite store.
Call ``configure`` first in the process: the registry functions use the URI it sets.

Version tags written by ``register_and_gate`` (the contract ``champion``/``regate`` read back):
``figure.<name>`` (repr of the float), ``lineage`` (JSON) and ``lineage.<key>``, ``decision``
(promoted/rejected), ``gate.passed``, ``gate.failed`` (comma list), ``gate.rule.<rule>``
("pass"/"FAIL value=... threshold=...: message"), ``previous_champion``; a superseded champion gets
``superseded_by`` and ``champion_until``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from qalora import gate
from qalora.config import GateParams, Params, TrackingParams
from qalora.paths import state_dir

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
MODEL_NAME = "model"  # the logged model's name inside the run
PYFUNC_FILE = Path(__file__).with_name("lowbit_pyfunc.py")
FIGURE_PREFIX, RULE_PREFIX = "figure.", "gate.rule."
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
_MAX_PARAM = 6000
_MAX_TAG = 5000
_SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "pandas", "qalora")


# ----------------------------------------------------------------------------- configuration

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
    tags = {f"lineage.{k}": _text(v, _MAX_TAG) for k, v in flatten(dict(lineage)).items()}
    tags["lineage"] = _text(dict(lineage), _MAX_TAG)
    if lineage.get("git_sha"):
        tags[MLFLOW_GIT_COMMIT] = str(lineage["git_sha"])
    return tags


# ----------------------------------------------------------------------------- the pipeline run

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
                    self.client.set_tag(child, "skipped_metrics", _text(skipped, _MAX_TAG))
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
            items = [RunTag(k, _text(v, _MAX_TAG)) for k, v in tags.items()]
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
            client.set_tag(run.info.run_id, "qalora.error", _text(f"{type(e).__name__}: {e}", _MAX_TAG))
        client.set_terminated(run.info.run_id, status)
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


# ----------------------------------------------------------------------------- registry

def _pip_requirements() -> list[str]:
    reqs = []
    for name in _SERVING_PACKAGES:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return [f"mlflow=={mlflow.__version__}", *reqs]


def log_lowbit_model(run_id: str, merged_dir: str | Path, device: str = "cpu"):
    """Log ``merged_dir`` as a pyfunc model in run ``run_id`` (models from code); returns MLflow's ModelInfo."""
    merged_dir = Path(merged_dir)
    for required in ("config.json", "model.safetensors", "qalora_quant.json", "manifest.json"):
        if not (merged_dir / required).is_file():
            raise FileNotFoundError(f"{merged_dir / required} is missing: not a complete low-bit model folder")
    # Model.log files the LoggedModel under the *active* experiment: make it the run's.
    mlflow.set_experiment(experiment_id=_client().get_run(run_id).info.experiment_id)
    with warnings.catch_warnings():
        # Expected: the signature is explicit; an input example would make MLflow load and run the model.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        return _log_model(run_id, merged_dir, device)


def _log_model(run_id: str, merged_dir: Path, device: str):
    from mlflow.models import Model

    from tasks import lowbit_pyfunc

    return Model.log(
        artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
        python_model=str(PYFUNC_FILE), artifacts={lowbit_pyfunc.ARTIFACT_KEY: str(merged_dir)},
        signature=lowbit_pyfunc.signature(), pip_requirements=_pip_requirements(),
        model_config={"device": device}, metadata={"format": "qalora-lowbit"},
    )


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return "None" if v is None else str(v)


def gate_tags(decision: Mapping[str, Any]) -> dict[str, str]:
    """Tags recording a gate decision: every rule with its value and threshold."""
    tags = {"gate.passed": str(bool(decision.get("passed"))).lower(),
            "gate.failed": ",".join(decision.get("failed") or [])}
    for r in decision.get("rules") or []:
        head = "pass" if r.get("passed") else "FAIL"
        tags[f"{RULE_PREFIX}{r['rule']}"] = _text(
            f"{head} value={_fmt(r.get('value'))} threshold={_fmt(r.get('threshold'))}: {r.get('message', '')}", _MAX_TAG)
    return tags


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def _clear_rule_tags(client: MlflowClient, name: str, version: str) -> None:
    """A re-gate replaces the old rules (rule names depend on the metrics compared)."""
    for stale in [k for k in client.get_model_version(name, version).tags if k.startswith(RULE_PREFIX)]:
        client.delete_model_version_tag(name, version, stale)


def _apply_decision(client: MlflowClient, name: str, version: str, decision: Mapping[str, Any]) -> dict[str, Any]:
    """Write the gate tags on ``version`` and move ``champion`` to it when the gate passed."""
    previous = _alias_version(client, name, CHAMPION)
    prev_version = str(previous.version) if previous is not None else None
    _clear_rule_tags(client, name, version)
    tags = gate_tags(decision)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if decision.get("passed"):
        if prev_version is not None and prev_version != version:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, prev_version)
            _set_version_tags(client, name, prev_version, {"superseded_by": version, "champion_until": now})
        client.set_registered_model_alias(name, CHAMPION, version)
        outcome = "promoted"
        tags |= {"previous_champion": prev_version or "", "promoted_at": now}
    else:
        outcome = "rejected"
    tags |= {"decision": outcome, "decided_at": now}
    _set_version_tags(client, name, version, tags)
    return {"version": version, "decision": outcome, "previous_champion": prev_version,
            "champion": version if outcome == "promoted" else prev_version}


def register_and_gate(run_id: str, merged_dir: Path, registered_model: str, decision: Mapping[str, Any],
                      figures: Mapping[str, float], lineage: Mapping[str, Any]) -> dict[str, Any]:
    """Log + register the merged low-bit model from run ``run_id`` and apply the gate ``decision``.

    Returns ``{"version", "decision": "promoted"|"rejected", "previous_champion", "champion", "model_uri"}``:
    ``previous_champion`` is the champion before this decision, ``champion`` the one after it."""
    client = _client()
    info = log_lowbit_model(run_id, merged_dir)
    figure_tags = {f"{FIGURE_PREFIX}{k}": _fmt(float(v)) for k, v in figures.items() if _metric_value(v) is not None}
    with contextlib.suppress(MlflowException):
        client.create_registered_model(
            registered_model, description="QA-LoRA fine-tuned, merged low-bit LLM (qalora); @champion serves.")
    mv = mlflow.register_model(info.model_uri, registered_model, tags={**figure_tags, **lineage_tags(lineage)})
    version = str(mv.version)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    result = _apply_decision(client, registered_model, version, decision)
    client.set_tag(run_id, "qalora.model_version", f"{registered_model}/{version}")
    client.set_tag(run_id, "qalora.decision", result["decision"])
    client.log_dict(run_id, {"decision": dict(decision), "registry": result}, "gate/decision.json")
    return result | {"model_uri": f"models:/{registered_model}/{version}"}


def version_figures(client: MlflowClient, mv) -> dict[str, float]:
    """A version's figures: its ``figure.*`` tags, else its run's metrics."""
    figures = {k[len(FIGURE_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(FIGURE_PREFIX)}
    if not figures and mv.run_id:
        figures = dict(client.get_run(mv.run_id).data.metrics)
    return figures


def _version_lineage(mv) -> dict[str, Any]:
    try:
        return json.loads(mv.tags.get("lineage", "{}"))
    except json.JSONDecodeError:
        return {}


def champion(registered_model: str) -> dict[str, Any] | None:
    """``{"version", "run_id", "figures", "lineage"}`` of ``<registered_model>@champion``, or None."""
    client = _client()
    mv = _alias_version(client, registered_model, CHAMPION)
    if mv is None:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "figures": version_figures(client, mv),
            "lineage": _version_lineage(mv)}


def regate(registered_model: str, version: str | int, params: GateParams) -> dict[str, Any]:
    """Re-evaluate the gate for an existing version from its stored figures against the current champion,
    and apply it (promote on pass). The current champion itself is re-checked against the absolute rules
    only and keeps its alias either way (``decision: "kept"``); demoting needs an explicit alias move.

    Returns the gate decision (``passed``, ``rules``, ``failed``) plus ``version``, ``decision``,
    ``previous_champion`` and ``champion``."""
    client = _client()
    version = str(version)
    mv = client.get_model_version(registered_model, version)
    figures = version_figures(client, mv)
    current = champion(registered_model)
    is_champion = current is not None and current["version"] == version
    decision = gate.decide(figures, None if (current is None or is_champion) else current["figures"], params)
    if is_champion:
        _clear_rule_tags(client, registered_model, version)
        _set_version_tags(client, registered_model, version,
                          {**gate_tags(decision), "regated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        result = {"version": version, "decision": "kept", "previous_champion": version, "champion": version}
    else:
        result = _apply_decision(client, registered_model, version, decision)
    return {**decision, **result}
