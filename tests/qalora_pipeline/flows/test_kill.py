"""kill -9 of `qalora run` at its most delicate point, holding the registry's champion lock between
registering its version and deciding it, then the same command again: it does not wait for the dead
holder, adopts the version the killed run registered instead of adding another, and ends with the same
bytes as the stages it reuses."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _lock_held(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return bool(con.execute("select 1 from registered_models where name like '%.champion-lock'").fetchall())
    except sqlite3.Error:  # tables not created yet, or a write in progress
        return False


@pytest.mark.slow
def test_kill_9_while_registering_then_rerun_keeps_one_version(project, state_dir):
    env = os.environ | {"QALORA_HOME": str(state_dir)}
    argv = [str(BIN / "qalora"), "run", "--params", str(project / "params.yaml"), "--project-dir", str(project)]
    db = state_dir / "mlflow" / "mlflow.db"
    log = project.parent / "killed-run.log"
    with open(log, "w") as out:  # a file, not a pipe: Prefect's temporary server outlives a SIGKILL and holds it
        proc = subprocess.Popen(argv, env=env, cwd=project, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not _lock_held(db):
            assert proc.poll() is None, "the run ended before it was seen holding the lock:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _lock_held(db)  # the killed run left its lock behind
        _rerun_and_check(argv, env, project, db, state_dir)
    finally:
        _kill_leftovers(state_dir)


def _kill_leftovers(state_dir: Path) -> None:
    """The killed run's Prefect temporary server (its child, now orphaned), found by its QALORA_HOME."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("QALORA_HOME") == str(state_dir):
                p.kill()
        except (psutil.Error, OSError):
            pass


def _rerun_and_check(argv, env, project: Path, db: Path, state_dir: Path) -> None:
    import mlflow

    t0 = time.monotonic()
    again = subprocess.run(argv, env=env, cwd=project, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert time.monotonic() - t0 < 300  # not the 10-minute wait for a live holder
    assert "gate: PROMOTED to champion (tiny-qalora v1)" in again.stdout, again.stdout[-3000:]
    assert not _lock_held(db)

    client = mlflow.MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    versions = client.search_model_versions("name = 'tiny-qalora'")
    assert [str(v.version) for v in versions] == ["1"]
    v1 = versions[0]
    assert v1.tags["decision"] == "promoted"
    from qalora.manifest import sha256_file

    merged = next((state_dir / "stages" / "merge").glob("merged-*"))
    assert v1.tags["weights_sha256"] == sha256_file(merged / "model.safetensors")
    assert not list((state_dir / "stages").rglob("*.partial"))  # no half-written stage left to mistake
