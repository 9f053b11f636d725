"""Content-addressed stage folders: a stage's folder name is a hash of everything it depends on.

``key = sha256(stage, stage params, input hashes, code version)``, where the code version hashes
only the files the stage's task module can run (:func:`qalora.manifest.code_version`). A folder
with a manifest.json is finished (stages write atomically), so a re-run with the same key skips the
stage. A tune interrupted mid-way left checkpoints next to its folder, so the re-run resumes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qalora import numerics
from qalora.manifest import MANIFEST, code_version, read_json, sha256_bytes
from qalora.paths import state_dir


@dataclass
class StageResult:
    """What a stage task returns to the flow: paths and hashes, never tensors."""

    stage: str
    dir: str
    key: str
    cached: bool
    metrics: dict[str, float] = field(default_factory=dict)


def stage_key(stage: str, material: dict[str, Any], code_module: str) -> str:
    blob = json.dumps({"stage": stage, "code": code_version(code_module), "numerics": numerics.key(), **material},
                      sort_keys=True, default=str)
    return sha256_bytes(blob.encode())


def stage_dir(stage: str, tag: str, key: str) -> Path:
    return state_dir() / "stages" / stage / f"{tag}-{key[:16]}"


def finished(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def result_from(stage: str, folder: Path, key: str, cached: bool) -> StageResult:
    manifest = read_json(folder / MANIFEST, f"{stage} manifest")
    metrics = {k: float(v) for k, v in (manifest.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return StageResult(stage, str(folder), key, cached, metrics)


def run_cached(stage: str, tag: str, material: dict[str, Any], build, code_module: str) -> StageResult:
    """Return the finished folder for this key, or call ``build(folder)`` to make it.

    ``code_module``: the task module (its ``__name__``) whose import closure versions the stage.
    """
    from prefect import get_run_logger

    key = stage_key(stage, material, code_module)
    folder = stage_dir(stage, tag, key)
    if finished(folder):
        get_run_logger().info("%s: cached, reusing %s", stage, folder)
        return result_from(stage, folder, key, cached=True)
    build(folder)
    return result_from(stage, folder, key, cached=False)
