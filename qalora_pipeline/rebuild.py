"""``qalora rebuild``: re-run a registered model version from its recorded lineage and compare bytes.

An auditor names a version (``3``, ``champion``, ``models:/name@champion``). From the version's
pipeline run this reads the params it ran with (``lineage/params.json``), its lineage (data md5, git
sha, dirty flag, package versions, numeric mode) and the manifests of the stages whose bytes are
deterministic (quantize, tune, merge: every output file's sha256). It checks the data matches the
recorded md5, re-runs the three stages into a scratch folder with the recorded params, and compares
the sha256 of every output file. When a file differs it names the first one and the lineage facts
that differ between then and here, which explain it (other CPU path, other package version, other
code, a dirty tree); when none differ, it says so (non-determinism inside a stage).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from qalora import numerics
from qalora.config import Params
from qalora.manifest import code_version, git_state, package_versions
from qalora.paths import resolve_model, resolve_path, state_dir
from qalora_pipeline import data_version
from qalora_pipeline.tracking import resolve_version

STAGES = ("quantize", "tune", "merge")
# Files whose content records wall-clock time, so they differ on every run by design.
TIMED = {("tune", "metrics.jsonl")}


class RebuildError(ValueError):
    """The version cannot be rebuilt here (its records are missing, or the data differs)."""


def _artifact_json(client, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="qalora-rebuild-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception as e:  # MLflow raises its own and OSError types for a missing artifact
            raise RebuildError(f"run {run_id} has no artifact {path} (registered before `qalora rebuild` existed?): "
                               f"{type(e).__name__}") from None
        return json.loads(Path(local).read_text())


def recorded(registered_model: str, ref: str) -> dict[str, Any]:
    """What the version's run recorded: version, run id, params, lineage, {stage: manifest}."""
    client = MlflowClient()
    mv = resolve_version(client, registered_model, ref)
    run = client.get_run(mv.run_id)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{mv.run_id}'")
    stage_runs = {r.data.tags.get("qalora.stage"): r.info.run_id for r in children}
    missing = [s for s in STAGES if s not in stage_runs]
    if missing:
        raise RebuildError(f"version {mv.version}'s run {mv.run_id} has no stage runs for {missing}")
    return {
        "version": str(mv.version), "run_id": mv.run_id,
        "weights_sha256": (mv.tags or {}).get("weights_sha256"),
        "params": _artifact_json(client, mv.run_id, "lineage/params.json"),
        "lineage": _artifact_json(client, mv.run_id, "lineage/lineage.json"),
        "manifests": {s: _artifact_json(client, stage_runs[s], "manifest.json") for s in STAGES},
    }


def lineage_differences(then: dict[str, Any], data_md5: str) -> list[str]:
    """One line per lineage fact that differs between the recorded run and this process."""
    git = git_state()
    lines = []
    if then.get("data_md5") != data_md5:
        lines.append(f"data_md5: recorded {then.get('data_md5')}, here {data_md5}")
    if then.get("code_version") != code_version():
        lines.append(f"code: recorded git {then.get('git_sha')} (code {str(then.get('code_version'))[:12]}), "
                     f"here git {git['sha']} (code {code_version()[:12]})")
    if then.get("git_dirty"):
        lines.append("dirty tree: the recorded run had uncommitted changes, which git cannot restore")
    if git["dirty"]:
        lines.append("dirty tree: this checkout has uncommitted changes")
    here_versions = package_versions()
    for pkg, version in sorted((then.get("versions") or {}).items()):
        if here_versions.get(pkg) != version:
            lines.append(f"versions.{pkg}: recorded {version}, here {here_versions.get(pkg)}")
    lines += numerics.explain(then.get("numerics") or {}, numerics.describe())
    return lines


def _rebuild_stages(p: Params, root: Path, out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Quantize -> tune -> merge with the recorded params, as the pipeline's tasks run them."""
    from qalora.merge import merge
    from qalora.quantize import quantize_to_folder
    from qalora.tune import tune

    calibration = resolve_path(p.data.calibration, root) if p.quantize.method == "gptq" else None
    return {
        "quantize": quantize_to_folder(resolve_model(p.model.source), out / "quantize", p.quantize, calibration,
                                       trust_remote_code=p.model.trust_remote_code, progress=progress),
        "tune": tune(out / "quantize", resolve_path(p.data.train, root), out / "tune", p.tune, progress=progress),
        "merge": merge(out / "quantize", out / "tune", out / "merge"),
    }


def compare(then: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per output file of each stage, in stage order: recorded and rebuilt sha256 and whether they match."""
    rows = []
    for stage in STAGES:
        a, b = then[stage].get("outputs", {}), now[stage].get("outputs", {})
        for name in sorted(set(a) | set(b)):
            timed = (stage, name) in TIMED
            rows.append({"file": f"{stage}/{name}", "recorded": a.get(name), "rebuilt": b.get(name),
                         "same": timed or a.get(name) == b.get(name), "compared": not timed})
    return rows


def rebuild(registered_model: str, ref: str, project_dir: str | Path = ".", out: str | Path | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Rebuild version ``ref`` of ``registered_model``; returns the comparison and the explanation.

    ``out`` (default a new folder under ``$QALORA_HOME/rebuild``) receives the rebuilt stage folders.
    """
    root = Path(project_dir).resolve()
    rec = recorded(registered_model, ref)
    then = rec["lineage"]
    data_md5 = data_version.verify(root)  # raises, naming the fix, when data/ does not match data.dvc
    if data_md5 != then.get("data_md5"):
        raise RebuildError(f"data/ is version {data_md5}, but version {rec['version']} was built from "
                           f"{then.get('data_md5')}: check out its data.dvc (git {then.get('git_sha')}) "
                           "and run `qalora data pull`")
    differences = lineage_differences(then, data_md5)
    if out is None:
        base = state_dir() / "rebuild"
        base.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix=f"v{rec['version']}-", dir=base))
    out = Path(out)
    now = _rebuild_stages(Params.model_validate(rec["params"]), root, out, progress)
    rows = compare(rec["manifests"], now)
    first = next((r for r in rows if not r["same"]), None)
    return {
        "registered_model": registered_model, "version": rec["version"], "run_id": rec["run_id"],
        "identical": first is None, "first_difference": first and first["file"],
        "explained_by": differences if first else [],
        "lineage_differences": differences, "files": rows, "rebuilt_in": str(out),
        "served_weights_match": rec["weights_sha256"] in (None, now["merge"]["outputs"].get("model.safetensors")),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``qalora rebuild`` prints: one line per file, then the verdict and its explanation."""
    lines = [f"rebuild of {result['registered_model']} v{result['version']} (run {result['run_id']}) "
             f"in {result['rebuilt_in']}"]
    for r in result["files"]:
        mark = "skip" if not r["compared"] else ("same" if r["same"] else "DIFF")
        note = " (records wall-clock time)" if not r["compared"] else ""
        lines.append(f"  {mark} {r['file']}  {str(r['rebuilt'])[:16]}{note}")
    if result["identical"]:
        lines.append("IDENTICAL: every compared file has the recorded sha256")
        lines += [f"  (differs, without effect on the bytes: {d})" for d in result["lineage_differences"]]
    else:
        lines.append(f"DIFFERENT: first differing file {result['first_difference']}")
        lines += [f"  explained by {d}" for d in result["explained_by"]] or [
            "  no recorded lineage fact differs: a stage is not deterministic on this machine (please report it)"]
    return lines
