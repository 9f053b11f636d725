"""Promotion: the pipeline's automatic gate + registration, and the manual ``gate`` (read-only),
``promote`` and ``rollback``. The rules are :mod:`qalora.gate`'s; the records are the registry's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qalora import gate
from qalora.config import GateParams
from qalora.manifest import sha256_file
from qalora_pipeline.tracking.registry import (
    ANSWERS_ARTIFACT, CHALLENGER, CHAMPION, FIGURE_PREFIX, FIGURES_ARTIFACT, GATE, PREVIOUS_CHAMPION, PROMOTE, PROMOTE_FORCED, ROLLBACK,
    WEIGHTS_TAG, PromotionRefused, RegistryError, _alias_version, champion_lock, _move_champion, _reason, _registry_summary,
    _write_decision, log_lowbit_model, resolve_version,
)
from qalora_pipeline.tracking.store import _client, _metric_value, _read_artifact, version_lineage_tags


def register_and_gate(run_id: str, merged_dir: Path, registered_model: str, params: GateParams,
                      figures: Mapping[str, float], lineage: Mapping[str, Any],
                      answers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Log + register the merged low-bit model from run ``run_id``, then gate it against the champion of
    the moment, under :func:`champion_lock`: two runs finishing together are decided one after the other,
    the second against the first if it was promoted. A pass is the pipeline's automatic promotion
    (``promoted_via: gate``, recorded in the audit log like any move).

    The figures go to the run as ``gate/figures.json`` and the per-question ``answers`` (when evaluated)
    as ``gate/answers.json``: what this and later gate checks read. The version's tags hold the decision,
    the failed rules, the lineage and the weights' sha256; every rule goes to ``gate/decision.json``.
    Returns ``{"version", "decision": "promoted"|"rejected", "previous_champion", "champion", "model_uri",
    "gate"}``: ``previous_champion`` is the champion compared against, ``champion`` the one after the
    decision, ``gate`` the decision (``passed``, ``rules``, ``failed``, ``compared_with``)."""
    client = _client()
    info = log_lowbit_model(run_id, merged_dir)
    client.log_dict(run_id, {k: float(v) for k, v in figures.items() if _metric_value(v) is not None}, FIGURES_ARTIFACT)
    if answers:
        client.log_dict(run_id, dict(answers), ANSWERS_ARTIFACT)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(
            registered_model, description="QA-LoRA fine-tuned, merged low-bit LLM (qalora); @champion serves.")
    tags = {**version_lineage_tags(lineage), WEIGHTS_TAG: sha256_file(Path(merged_dir) / "model.safetensors")}
    mv = _interrupted_registration(client, registered_model, tags) or mlflow.register_model(
        info.model_uri, registered_model, tags=tags)
    version = str(mv.version)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    with champion_lock(client, registered_model):
        decision = _gate_check(client, registered_model, mv, params)
        previous = decision["champion"]
        outcome = "promoted" if decision["passed"] else "rejected"
        _write_decision(client, registered_model, version, decision, outcome, previous)
        if outcome == "promoted":
            _move_champion(client, registered_model, version, GATE, f"pipeline run {run_id} passed the gate",
                           decision=decision)
    result = {"version": version, "decision": outcome, "previous_champion": previous,
              "champion": version if outcome == "promoted" else previous}
    client.set_tag(run_id, "qalora.model_version", f"{registered_model}/{version}")
    client.set_tag(run_id, "qalora.decision", outcome)
    client.log_dict(run_id, {"decision": dict(decision), "registry": result}, "gate/decision.json")
    return result | {"model_uri": f"models:/{registered_model}/{version}", "gate": decision}


def _interrupted_registration(client: MlflowClient, name: str, tags: Mapping[str, str]):
    """A version of the same weights and lineage that a killed run registered but never decided (no
    ``decision`` tag): re-running adopts it, so the registry holds one version per build, not one per try."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and tag.{WEIGHTS_TAG} = '{tags[WEIGHTS_TAG]}'")
    except MlflowException:
        return None
    same = [v for v in versions if "decision" not in v.tags
            and all(v.tags.get(k) == str(val) for k, val in tags.items())]
    return max(same, key=lambda v: int(v.version)) if same else None


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


def version_answers(client: MlflowClient, mv) -> dict[str, Any] | None:
    """A version's per-question record (its run's ``gate/answers.json``), or None when it has none."""
    stored = _read_artifact(client, mv.run_id, ANSWERS_ARTIFACT) if mv.run_id else None
    return json.loads(stored) if stored is not None else None


def _version_lineage(mv) -> dict[str, Any]:
    try:
        return json.loads(mv.tags.get("lineage", "{}"))
    except json.JSONDecodeError:
        return {}


def champion(registered_model: str) -> dict[str, Any] | None:
    """``{"version", "run_id", "figures", "answers", "lineage"}`` of ``<registered_model>@champion``, or None."""
    client = _client()
    mv = _alias_version(client, registered_model, CHAMPION)
    if mv is None:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "figures": version_figures(client, mv),
            "answers": version_answers(client, mv), "lineage": _version_lineage(mv)}


def _gate_check(client: MlflowClient, name: str, mv, params: GateParams) -> dict[str, Any]:
    """The gate decision for ``mv`` against the current champion (the champion itself: absolute rules only)."""
    current = _alias_version(client, name, CHAMPION)
    version, champ = str(mv.version), (str(current.version) if current is not None else None)
    is_champion = champ == version
    compared = champ is not None and not is_champion
    decision = gate.decide(version_figures(client, mv), version_figures(client, current) if compared else None, params,
                           version_answers(client, mv), version_answers(client, current) if compared else None)
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
    with champion_lock(client, registered_model):
        return _promote_locked(client, registered_model, mv, params, reason, force, actor)


def _promote_locked(client: MlflowClient, registered_model: str, mv, params: GateParams, reason: str, force: bool,
                    actor: str | None) -> dict[str, Any]:
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
    with champion_lock(client, registered_model):
        return _rollback_locked(client, registered_model, reason, actor)


def _rollback_locked(client: MlflowClient, registered_model: str, reason: str | None, actor: str | None) -> dict[str, Any]:
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
