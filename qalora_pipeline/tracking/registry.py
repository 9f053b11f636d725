"""The model registry: logging the merged folder as a pyfunc model, versions and aliases, the gate
decision as version tags, and every move of ``champion`` with its audit log line.

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
ever appended.

One mover at a time: every decision that may move ``champion`` (the pipeline's gate, ``promote``,
``rollback``) runs inside :func:`champion_lock`, and the gate decides *inside* it against the champion
of that moment. The lock is a registered model ``<model>.champion-lock`` (creating a registered model is
atomic on every MLflow backend: a second create fails), so it holds across processes and machines
sharing one MLflow server; it exists only while a move is being decided.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import importlib.metadata
import json
import os
import contextlib
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qalora.manifest import pid_alive
from qalora_pipeline.tracking.store import MAX_TAG, _client, _read_artifact, _text

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
MODEL_NAME = "model"  # the logged model's name inside the run
PYFUNC_FILE = Path(__file__).with_name("lowbit_pyfunc.py")
FIGURE_PREFIX, RULE_PREFIX = "figure.", "gate.rule."  # figure.*: only on versions registered before gate/figures.json
FIGURES_ARTIFACT = "gate/figures.json"  # on the pipeline run: the figures the gate decided on
ANSWERS_ARTIFACT = "gate/answers.json"  # on the pipeline run: per-question correctness (qalora.paired)
WEIGHTS_TAG = "weights_sha256"  # version tag: sha256 of model.safetensors, the served identity
AUDIT_FILE, AUDIT_TAG = "registry_audit.jsonl", "audit_log"
# How a version became champion (tag promoted_via, audit "action").
GATE, PROMOTE, PROMOTE_FORCED, ROLLBACK = "gate", "promote", "promote --force", "rollback"
_FORMER_CHAMPION_TAGS = ("superseded_by", "champion_until", "rolled_back_at", "rolled_back_by", "rolled_back_reason",
                         "promotion_forced")
_SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "pandas", "qalora")


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

    from qalora_pipeline.tracking import lowbit_pyfunc

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


LOCK_SUFFIX = ".champion-lock"
LOCK_WAIT_S = 600  # how long a mover waits for another one
LOCK_STALE_S = 900  # a lock older than this was left by a mover that died: taken over, and said so


@contextlib.contextmanager
def champion_lock(client: MlflowClient, name: str, wait_s: float = LOCK_WAIT_S,
                  stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the right to decide and move ``champion`` of ``name`` (see the module docstring); waits up to
    ``wait_s`` for another holder (RegistryError naming it past that), takes over a lock older than ``stale_s``."""
    lock = name + LOCK_SUFFIX
    host = socket.gethostname()
    holder = f"{current_user()}@{host} pid {os.getpid()}"
    deadline, delay = time.monotonic() + wait_s, 0.2
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "host": host, "pid": str(os.getpid()),
                                                       "since": str(time.time())},
                                           description=f"held while {name}'s champion is decided and moved")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            tags = client.get_registered_model(lock).tags
        except MlflowException:  # released meanwhile
            continue
        age = time.time() - float(tags.get("since", "0") or 0)
        dead = tags.get("host") == host and not pid_alive(int(tags.get("pid") or 0))  # killed on this machine
        if dead or age > stale_s:
            warnings.warn(f"taking over the champion lock of {name!r} left {age:.0f} s ago by {tags.get('holder')} "
                          f"({'no longer running' if dead else 'stale'})", stacklevel=2)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"{name!r}'s champion is being moved by {tags.get('holder', 'another process')} "
                                f"(lock {lock!r}, {age:.0f} s old); gave up after {wait_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


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
            "gate.failed": _text(",".join(decision.get("failed") or []), MAX_TAG),
            "gate.rules": f"{sum(1 for r in rules if r.get('passed'))}/{len(rules)} passed"}
    for r in rules:
        if not r.get("passed"):
            tags[f"{RULE_PREFIX}{r['rule']}"] = _text(
                f"FAIL value={_fmt(r.get('value'))} threshold={_fmt(r.get('threshold'))}: {r.get('message', '')}", MAX_TAG)
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
                                              "promotion_reason": _text(reason, MAX_TAG),
                                              "previous_champion": replaced or ""}
                      | ({"promotion_forced": "true"} if action == PROMOTE_FORCED else {}))
    if replaced is not None:
        old = {"superseded_by": version, "champion_until": now}
        if action == ROLLBACK:
            old |= {"rolled_back_at": now, "rolled_back_by": by, "rolled_back_reason": _text(reason, MAX_TAG)}
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
