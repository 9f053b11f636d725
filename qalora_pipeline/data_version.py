"""DVC versioning of ``data/``: build, track, verify, push and pull through the real ``dvc`` CLI.

The DVC cache and the default remote live under the project state dir and are configured in
``.dvc/config.local`` (git-ignored), so a checkout only carries ``data.dvc``. Any other remote is one
command away, e.g. ``dvc remote add -d s3 s3://bucket/qalora`` or ``dvc remote add -d ssh ssh://host/path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from qalora.data_build import build_data
from qalora.paths import state_dir

DATA = "data"
DVC_FILE = "data.dvc"
FIX = ("run `qalora data build` to regenerate data/ from the pinned sources, or `qalora data pull` "
       "to fetch the version data.dvc names from the DVC remote")


class DataVersionError(RuntimeError):
    pass


def dvc(root: str | Path, *args: str) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataVersionError(f"`dvc {' '.join(args)}` failed in {root}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def ensure_repo(root: str | Path) -> None:
    """``dvc init`` if needed; cache and default remote ``local`` under the state dir (local config)."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        dvc(root, "init", "-q", *([] if (root / ".git").exists() else ["--no-scm"]))
    dvc(root, "config", "--local", "cache.dir", str(state_dir() / "dvc-cache"))
    remote = state_dir() / "dvc-remote"
    remote.mkdir(parents=True, exist_ok=True)
    dvc(root, "remote", "add", "--local", "-f", "-d", "local", str(remote))


def data_md5(root: str | Path) -> str:
    """The md5 that data.dvc pins (DVC's directory hash, e.g. ``…​.dir``)."""
    path = Path(root) / DVC_FILE
    if not path.is_file():
        raise DataVersionError(f"{path} is missing: {FIX}")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5")
    if not md5:
        raise DataVersionError(f"{path} has no md5 for its output: re-create it with `qalora data build`")
    return md5


def track(root: str | Path) -> str:
    """``dvc add data`` and push it to the default remote; returns the md5 data.dvc now pins."""
    root = Path(root)
    ensure_repo(root)
    dvc(root, "add", "-q", DATA)
    dvc(root, "push", "-q", DVC_FILE)
    return data_md5(root)


def build_and_track(root: str | Path) -> str:
    """Build data/ from the pinned sources, then :func:`track` it."""
    build_data(Path(root) / DATA)
    return track(root)


def verify(root: str | Path) -> str:
    """Refuse when data/ does not match data.dvc; returns the pinned md5 for lineage."""
    root = Path(root)
    md5 = data_md5(root)
    if not (root / DATA).is_dir():
        raise DataVersionError(f"{root / DATA} is missing: {FIX}")
    ensure_repo(root)
    status = json.loads(dvc(root, "status", "--json", DVC_FILE) or "{}")
    if status:
        raise DataVersionError(f"{root / DATA} does not match {DVC_FILE} ({json.dumps(status)}): {FIX}")
    return md5


def push(root: str | Path, remote: str | None = None) -> None:
    dvc(root, "push", DVC_FILE, *(["-r", remote] if remote else []))


def pull(root: str | Path, remote: str | None = None) -> None:
    ensure_repo(root)
    dvc(root, "pull", DVC_FILE, *(["-r", remote] if remote else []))
