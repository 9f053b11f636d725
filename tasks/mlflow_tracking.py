"""MLflow tracking and the model registry for the qalora pipeline.

* ``configure``         tracking + registry URI (default: sqlite under ``$QALORA_HOME/mlflow``), experiment.
* ``pipeline_run``      one parent run per pipeline run: every param (dotted keys), lineage tags, one nested
                        run per stage (metrics also on the parent as ``<stage>.<metric>``), DVC-pinned
                        dataset inputs, artifacts; ends FAILED on an exception.
* ``register_and_gate`` logs the merged low-bit folder as a pyfunc model ("models from code",
                        tasks/lowbit_pyfunc.py), registers a version, aliases it ``challenger``, tags it with
                        the decision, the failed rules and the lineage, and moves ``champion`` to it when the
                        gate passed: the pipeline's automatic promotion.
* ``champion``          the current ``@champion`` version's figures and lineage (None when none).
* ``gate_version``      read-only: the decision a version would get against the current champion.
* ``promote``           the one manual way to move ``champion`` (refuses a failing version unless forced).
* ``rollback``          ``champion`` back to ``previous-champion``.
* ``audit_log``         every champion move, oldest first.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent active-run stack), so it is
safe from Prefect worker threads; one lock per pipeline run serialises writes to the sqlite store.
Call ``configure`` first in the process: the registry functions use the URI it sets.

Aliases: ``challenger`` = the latest registered version; ``champion`` = the one that serves;
``previous-champion`` = the champion it replaced, i.e. what ``rollback`` restores (a rollback removes it).

Version tags (the contract ``champion``/``gate_version`` read back): ``lineage`` (JSON) and
``lineage.<key>`` per scalar, ``weights_sha256`` (of the served ``model.safetensors``), ``decision``
(promoted/rejected), ``decided_at``, ``gate.passed``, ``gate.failed`` (comma list), ``gate.rules``
("12/14 passed"), ``gate.against`` (the champion compared with), ``gate.rule.<rule>`` for each *failed*
rule ("FAIL value=... threshold=...: message"). Each champion move adds ``promoted_at``/``_by``/``_via``
(gate, promote, promote --force, rollback), ``promotion_reason``, ``previous_champion`` (the version it
replaced); the replaced one gets ``superseded_by``, ``champion_until`` and, on a rollback,
``rolled_back_at``/``_by``/``_reason``. The figures live on the run (metrics, ``gate/figures.json``),
every rule in ``gate/decision.json``; versions registered earlier carry ``figure.<name>`` tags instead.

Audit log: one JSON line per champion move (``at``, ``by``, ``action``, ``version``, ``replaced``,
``reason``, ``run_id``, ``weights_sha256``, ``gate``) in ``registry_audit.jsonl``, an artifact of a
dedicated run ``registry-audit-<model>`` (tag ``qalora.kind=registry-audit``) in the experiment of the
first version moved; the registered-model tag ``audit_log`` holds its ``runs:/`` URI. Lines are only
ever appended; one writer at a time is assumed (a person promoting while a pipeline run promotes
could lose a line to the race, never rewrite one).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import importlib.metadata
import json
import os
import tempfile
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
from qalora.manifest import sha256_file
from qalora.paths import state_dir

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
MODEL_NAME = "model"  # the logged model's name inside the run
PYFUNC_FILE = Path(__file__).with_name("lowbit_pyfunc.py")
FIGURE_PREFIX, RULE_PREFIX = "figure.", "gate.rule."  # figure.*: only on versions registered before gate/figures.json
FIGURES_ARTIFACT = "gate/figures.json"  # on the pipeline run: the figures the gate decided on
WEIGHTS_TAG = "weights_sha256"  # version tag: sha256 of model.safetensors, the served identity
AUDIT_FILE, AUDIT_TAG = "registry_audit.jsonl", "audit_log"
# How a version became champion (tag promoted_via, audit "action").
GATE, PROMOTE, PROMOTE_FORCED, ROLLBACK = "gate", "promote", "promote --force", "rollback"
_FORMER_CHAMPION_TAGS = ("superseded_by", "champion_until", "rolled_back_at", "rolled_back_by", "rolled_back_reason",
                         "promotion_forced")
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


class RegistryError(ValueError):
    """A registry action that cannot be done as asked: unknown version or alias, nothing to roll back, ..."""


class PromotionRefused(RegistryError):
    """``promote`` of a version that fails the gate, without ``force``."""


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def current_user() -> str:
    """Who acts: the login name (``getpass``: $LOGNAME/$USER/... or the password database)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no such env var and no passwd entry (some containers)
        return os.environ.get("USER") or "unknown"


def _reason(reason: str | None, required: bool) -> str:
    """One line of text for tags and the audit log; ``--reason`` may not be blank where it is required."""
    text = " ".join((reason or "").split())
    if not text and required:
        raise RegistryError("--reason is empty: say why (it is recorded in the version's tags and the audit log)")
    return text or "(no reason given)"


def _registry_summary(client: MlflowClient, name: str) -> str:
    """``versions 1, 2, 3; aliases champion=v2, challenger=v3`` for error messages (raises if no such model)."""
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise RegistryError(f"registered model {name!r} does not exist (tracking.registered_model): "
                                "no pipeline run has registered a version of it yet") from None
        raise
    versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(rm.aliases.items())) or "none"
    return f"versions {', '.join(map(str, versions)) or 'none'}; aliases {aliases}"


def _parse_ref(registered_model: str, ref: str | int) -> tuple[str | None, str | None]:
    """(version, alias) named by ``N``, ``ALIAS``, ``@ALIAS``, ``models:/NAME/N`` or ``models:/NAME@ALIAS``."""
    text = str(ref).strip()
    if text.startswith("models:/"):
        body = text[len("models:/"):]
        model, sep, alias = body.partition("@")
        if not sep:
            model, _, version = body.rpartition("/")
            alias = None
        else:
            version = None
        if not model or not (alias or version):
            raise RegistryError(f"--version {text!r} is not a model URI; valid: models:/{registered_model}/N "
                                f"or models:/{registered_model}@ALIAS")
        if model != registered_model:
            raise RegistryError(f"--version {text!r} names registered model {model!r}, but tracking.registered_model "
                                f"is {registered_model!r} (pass --set tracking.registered_model={model})")
        return version, alias
    if text.isdigit():
        return text, None
    alias = text.removeprefix("@")
    if not alias:
        raise RegistryError(f"--version {text!r} is empty; valid: a version number, an alias or a models:/ URI")
    return None, alias


def resolve_version(client: MlflowClient, registered_model: str, ref: str | int):
    """The ModelVersion named by ``ref`` (number, alias, ``@alias`` or ``models:/`` URI); RegistryError naming
    the version or alias and what exists when there is none."""
    version, alias = _parse_ref(registered_model, ref)
    if version is not None:
        try:
            return client.get_model_version(registered_model, version)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise
            raise RegistryError(f"version {version} of {registered_model!r} does not exist; valid: "
                                f"{_registry_summary(client, registered_model)}") from None
    mv = _alias_version(client, registered_model, alias)
    if mv is None:
        raise RegistryError(f"alias {alias!r} is not set on {registered_model!r}; valid: "
                            f"{_registry_summary(client, registered_model)}")
    return mv


def gate_tags(decision: Mapping[str, Any]) -> dict[str, str]:
    """Tags recording a gate decision: the verdict and each *failed* rule with its value and threshold.
    Every rule (passed ones too) is in the run's ``gate/decision.json``; tags stay a readable handful."""
    rules = decision.get("rules") or []
    tags = {"gate.passed": str(bool(decision.get("passed"))).lower(),
            "gate.failed": _text(",".join(decision.get("failed") or []), _MAX_TAG),
            "gate.rules": f"{sum(1 for r in rules if r.get('passed'))}/{len(rules)} passed"}
    for r in rules:
        if not r.get("passed"):
            tags[f"{RULE_PREFIX}{r['rule']}"] = _text(
                f"FAIL value={_fmt(r.get('value'))} threshold={_fmt(r.get('threshold'))}: {r.get('message', '')}", _MAX_TAG)
    return tags


def version_lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """The lineage on a model version: the whole as JSON in ``lineage``, each scalar as ``lineage.<key>``
    (nested entries such as package versions only in the JSON and on the run)."""
    tags = {f"lineage.{k}": _text(v, _MAX_TAG) for k, v in lineage.items() if not isinstance(v, Mapping)}
    tags["lineage"] = _text(dict(lineage), _MAX_TAG)
    return tags


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def _write_decision(client: MlflowClient, name: str, version: str, decision: Mapping[str, Any], outcome: str,
                    against: str | None) -> None:
    """Record a gate decision on ``version``, replacing the previous one's rule tags (which rules fail
    depends on the champion compared against)."""
    for stale in [k for k in client.get_model_version(name, version).tags if k.startswith(RULE_PREFIX)]:
        client.delete_model_version_tag(name, version, stale)
    _set_version_tags(client, name, version, {**gate_tags(decision), "decision": outcome, "decided_at": _now(),
                                              "gate.against": f"v{against}" if against else "no champion"})


# ----------------------------------------------------------------------------- audit log

def _read_artifact(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    """A run artifact's bytes, or None when the run has no such file."""
    folder, _, _ = path.rpartition("/")
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def _audit_run_id(client: MlflowClient, name: str) -> str | None:
    uri = client.get_registered_model(name).tags.get(AUDIT_TAG)
    return uri.removeprefix("runs:/").split("/", 1)[0] if uri else None


def _append_audit(client: MlflowClient, name: str, entry: Mapping[str, Any], version_run_id: str | None) -> str:
    """Append ``entry`` as one JSON line to the model's audit log (created on first use: a run named
    ``registry-audit-<name>`` in the experiment of ``version_run_id``, found later through the
    registered-model tag ``audit_log``). Earlier lines are copied byte for byte; the file is only ever
    extended. Returns the audit run's id."""
    run_id = _audit_run_id(client, name)
    if run_id is None:
        if not version_run_id:
            raise RegistryError(f"version {entry.get('version')} of {name!r} has no source run: no experiment to "
                                "hold the audit log run in")
        experiment_id = client.get_run(version_run_id).info.experiment_id
        run_id = client.create_run(experiment_id, run_name=f"registry-audit-{name}", tags={
            "qalora.kind": "registry-audit", "qalora.registered_model": name,
            "mlflow.note.content": f"Append-only log of every move of {name}@champion ({AUDIT_FILE})."}).info.run_id
        client.set_terminated(run_id, "FINISHED")
        client.set_registered_model_tag(name, AUDIT_TAG, f"runs:/{run_id}/{AUDIT_FILE}")
    old = _read_artifact(client, run_id, AUDIT_FILE) or b""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / AUDIT_FILE
        path.write_bytes(old + (json.dumps(dict(entry), sort_keys=True) + "\n").encode())
        client.log_artifact(run_id, str(path))
    return run_id


def audit_log(registered_model: str) -> list[dict[str, Any]]:
    """Every recorded champion move of ``registered_model``, oldest first ([] before the first)."""
    client = _client()
    run_id = _audit_run_id(client, registered_model)
    raw = _read_artifact(client, run_id, AUDIT_FILE) if run_id else None
    return [json.loads(line) for line in (raw or b"").decode().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- champion moves

def _move_champion(client: MlflowClient, name: str, version: str, action: str, reason: str,
                   actor: str | None = None, decision: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Point ``champion`` at ``version`` and record who/when/why/what it replaced (version tags + audit log).

    A promotion keeps the replaced champion as ``previous-champion`` (what ``rollback`` restores); a
    rollback consumes that alias, so a second rollback cannot silently re-instate the version just
    rolled back. Aliases move first, then tags, then the audit line: the log records moves that happened."""
    current = _alias_version(client, name, CHAMPION)
    replaced = str(current.version) if current is not None else None
    if replaced == version:
        raise RegistryError(f"version {version} of {name!r} is already the champion; nothing to move")
    now, by = _now(), actor or current_user()
    if action == ROLLBACK:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    elif replaced is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, replaced)
    client.set_registered_model_alias(name, CHAMPION, version)
    # Tags of an earlier stint as champion would contradict the alias now (the audit log keeps that history).
    for stale in set(client.get_model_version(name, version).tags) & set(_FORMER_CHAMPION_TAGS):
        client.delete_model_version_tag(name, version, stale)
    _set_version_tags(client, name, version, {"promoted_at": now, "promoted_by": by, "promoted_via": action,
                                              "promotion_reason": _text(reason, _MAX_TAG),
                                              "previous_champion": replaced or ""}
                      | ({"promotion_forced": "true"} if action == PROMOTE_FORCED else {}))
    if replaced is not None:
        old = {"superseded_by": version, "champion_until": now}
        if action == ROLLBACK:
            old |= {"rolled_back_at": now, "rolled_back_by": by, "rolled_back_reason": _text(reason, _MAX_TAG)}
        _set_version_tags(client, name, replaced, old)
    mv = client.get_model_version(name, version)
    entry: dict[str, Any] = {"at": now, "by": by, "action": action, "registered_model": name, "version": version,
                             "replaced": replaced, "reason": reason, "run_id": mv.run_id,
                             "weights_sha256": mv.tags.get(WEIGHTS_TAG)}
    if decision is not None:
        entry["gate"] = {"passed": bool(decision.get("passed")), "failed": list(decision.get("failed") or []),
                         "against": replaced}
    entry["audit_run_id"] = _append_audit(client, name, entry, mv.run_id)
    return entry


def register_and_gate(run_id: str, merged_dir: Path, registered_model: str, decision: Mapping[str, Any],
                      figures: Mapping[str, float], lineage: Mapping[str, Any]) -> dict[str, Any]:
    """Log + register the merged low-bit model from run ``run_id`` and apply the gate ``decision``: the
    pipeline's automatic promotion (``promoted_via: gate``, recorded in the audit log like any move).

    The version's tags hold the decision, the failed rules, the lineage and the weights' sha256; the
    figures go to the run as ``gate/figures.json`` (what later gate checks read) next to
    ``gate/decision.json`` (every rule). Returns ``{"version", "decision": "promoted"|"rejected",
    "previous_champion", "champion", "model_uri"}``: ``previous_champion`` is the champion before this
    decision, ``champion`` the one after it."""
    client = _client()
    info = log_lowbit_model(run_id, merged_dir)
    client.log_dict(run_id, {k: float(v) for k, v in figures.items() if _metric_value(v) is not None}, FIGURES_ARTIFACT)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(
            registered_model, description="QA-LoRA fine-tuned, merged low-bit LLM (qalora); @champion serves.")
    tags = {**version_lineage_tags(lineage), WEIGHTS_TAG: sha256_file(Path(merged_dir) / "model.safetensors")}
    mv = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    version = str(mv.version)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    current = _alias_version(client, registered_model, CHAMPION)
    previous = str(current.version) if current is not None else None
    outcome = "promoted" if decision.get("passed") else "rejected"
    _write_decision(client, registered_model, version, decision, outcome, previous)
    if outcome == "promoted":
        _move_champion(client, registered_model, version, GATE, f"pipeline run {run_id} passed the gate",
                       decision=decision)
    result = {"version": version, "decision": outcome, "previous_champion": previous,
              "champion": version if outcome == "promoted" else previous}
    client.set_tag(run_id, "qalora.model_version", f"{registered_model}/{version}")
    client.set_tag(run_id, "qalora.decision", outcome)
    client.log_dict(run_id, {"decision": dict(decision), "registry": result}, "gate/decision.json")
    return result | {"model_uri": f"models:/{registered_model}/{version}"}


def version_figures(client: MlflowClient, mv) -> dict[str, float]:
    """A version's figures: its run's ``gate/figures.json``; versions registered before that file existed
    carry ``figure.*`` tags; else the run's metrics."""
    figures = {k[len(FIGURE_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(FIGURE_PREFIX)}
    if figures or not mv.run_id:
        return figures
    stored = _read_artifact(client, mv.run_id, FIGURES_ARTIFACT)
    if stored is not None:
        return {k: float(v) for k, v in json.loads(stored).items()}
    return dict(client.get_run(mv.run_id).data.metrics)


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


def _gate_check(client: MlflowClient, name: str, mv, params: GateParams) -> dict[str, Any]:
    """The gate decision for ``mv`` against the current champion (the champion itself: absolute rules only)."""
    current = _alias_version(client, name, CHAMPION)
    version, champ = str(mv.version), (str(current.version) if current is not None else None)
    is_champion = champ == version
    against = version_figures(client, current) if champ is not None and not is_champion else None
    decision = gate.decide(version_figures(client, mv), against, params)
    would = "keep" if is_champion else ("promote" if decision["passed"] else "reject")
    return {"registered_model": name, "version": version, "champion": champ,
            "compared_with": None if is_champion else champ, "would": would, **decision}


def gate_version(registered_model: str, version: str | int, params: GateParams) -> dict[str, Any]:
    """Read-only: the gate decision ``version`` would get against the current champion, every rule; changes
    nothing in the registry. ``would`` is ``promote``/``reject``, or ``keep`` for the champion itself (then
    only the absolute rules apply: it is not compared with itself). Moving ``champion`` is ``promote``'s job.

    Returns the decision (``passed``, ``rules``, ``failed``) plus ``registered_model``, ``version``,
    ``champion``, ``compared_with`` and ``would``."""
    client = _client()
    return _gate_check(client, registered_model, resolve_version(client, registered_model, version), params)


def promote(registered_model: str, version: str | int, params: GateParams, reason: str, force: bool = False,
            actor: str | None = None) -> dict[str, Any]:
    """Move ``champion`` to ``version`` by hand, after the gate against the current champion; a version that
    fails it is refused (PromotionRefused naming the failed rules) unless ``force``. ``reason`` is required.
    The old champion becomes ``previous-champion``. Returns the audit entry plus ``decision`` (the gate's)."""
    reason = _reason(reason, required=True)
    client = _client()
    mv = resolve_version(client, registered_model, version)
    check = _gate_check(client, registered_model, mv, params)
    v = check["version"]
    if check["would"] == "keep":
        raise RegistryError(f"version {v} of {registered_model!r} is already the champion; nothing to promote "
                            f"(valid: any other version; {_registry_summary(client, registered_model)})")
    if not check["passed"] and not force:
        failed = "; ".join(f"{r['rule']}: {r['message']}" for r in check["rules"] if not r["passed"])
        raise PromotionRefused(f"refusing to promote {registered_model} v{v}: it fails the gate against "
                               f"{'champion v' + check['champion'] if check['champion'] else 'the absolute rules'} "
                               f"({failed}); pass --force (still with --reason) to promote it anyway")
    forced = not check["passed"]
    _write_decision(client, registered_model, v, check, "promoted", check["champion"])
    entry = _move_champion(client, registered_model, v, PROMOTE_FORCED if forced else PROMOTE, reason, actor,
                           decision=check)
    return {**entry, "decision": check}


def rollback(registered_model: str, reason: str | None = None, actor: str | None = None) -> dict[str, Any]:
    """Move ``champion`` back to ``previous-champion`` (no gate: it served before) and drop that alias.
    RegistryError when there is no champion or no previous-champion. Returns the audit entry."""
    client = _client()
    current = _alias_version(client, registered_model, CHAMPION)
    if current is None:
        raise RegistryError(f"{registered_model!r} has no champion alias: nothing to roll back "
                            f"({_registry_summary(client, registered_model)})")
    previous = _alias_version(client, registered_model, PREVIOUS_CHAMPION)
    if previous is None:
        raise RegistryError(
            f"{registered_model!r} has no previous-champion alias to roll back to (champion is v{current.version}; "
            "an earlier rollback consumed it, or there was only one champion); promote a version explicitly: "
            "qalora promote --version N --reason '...'")
    return _move_champion(client, registered_model, str(previous.version), ROLLBACK, _reason(reason, required=False),
                          actor)
