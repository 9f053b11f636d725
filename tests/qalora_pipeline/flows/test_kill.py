"""kill -9 of `qalora run` at every stage, then the same command again.

- At each stage's commit (:mod:`qalora.crash`: every file of the stage written into its temporary
  folder, not yet renamed into place) and at three points of tune (before its first checkpoint, after
  it, after the second), one after the other on one state dir: each re-run redoes or resumes the stage,
  never takes the half-written folder for a finished one, sweeps the dead writer's leftovers, and the
  chain ends with the same stage folders and weight bytes as an uninterrupted run, one version registered.
- Holding the registry's champion lock between registering its version and deciding it (a real
  external SIGKILL): the re-run does not wait for the dead holder and adopts the version the killed run
  registered instead of adding another.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qalora.crash import ENV as CRASH_AT
from qalora.manifest import MANIFEST, sha256_file

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


# (crash point, where its stage's half-written folder is left): tune runs 6 steps with a checkpoint every 2,
# so the re-runs resume tune from nothing, from step 2 and from step 4.
CRASHES = [
    ("quantize.commit", "quantize"),
    ("tune-checkpoint.commit:1", "tune"),  # before the step-2 checkpoint is in place
    ("tune-checkpoint.commit:2", "tune"),  # step 2's is, step 4's is not
    ("tune.commit", "tune"),
    ("merge.commit", "merge"),
    ("check.commit:2", "check"),  # the first is the check's own save -> reload round trip, in a temp dir
    ("benchmark.commit", "benchmark"),
    ("evaluate.commit", "evaluate"),
]


def _finished(state: Path, stage: str = "*") -> list[Path]:
    """Finished stage folders (pathlib's glob also matches the hidden temporary ones: not those)."""
    return [m.parent for m in (state / "stages").glob(f"{stage}/*/{MANIFEST}") if not m.parent.name.startswith(".")]


def _weights(state: Path) -> dict[str, str]:
    """Every finished stage folder's weight files (hash) and evaluation figures, by path under stages/
    (eval.json also records wall times: its metrics and per-question answers are what must match)."""
    files = {}
    for folder in _finished(state):
        for f in folder.rglob("*"):
            if f.suffix == ".safetensors":
                files[str(f.relative_to(state / "stages"))] = sha256_file(f)
            elif f.name == "eval.json":
                result = json.loads(f.read_text())
                files[str(f.relative_to(state / "stages"))] = json.dumps([result["metrics"], result.get("answers")],
                                                                        sort_keys=True)
    return files


@pytest.mark.slow
def test_kill_9_at_every_stage_then_rerun_ends_with_the_uninterrupted_bytes(project, prefect_server, state_dir,
                                                                            tmp_path):
    import shutil

    import mlflow

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"] |= {"steps": 6, "save_every": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    argv = [str(BIN / "qalora"), "run", "--params", str(project / "params.yaml"), "--project-dir", str(project)]

    def run(state: Path, crash: str | None = None) -> subprocess.CompletedProcess:
        env = os.environ | {"QALORA_HOME": str(state), "PREFECT_API_URL": prefect_server}
        env.pop(CRASH_AT, None)
        if crash:
            env[CRASH_AT] = crash
        return subprocess.run(argv, env=env, cwd=project, capture_output=True, text=True, timeout=600)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for state in (reference, killed):  # two state dirs, each with the DVC cache of the project's data
        shutil.copytree(state_dir, state)
    done = run(reference)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = _weights(reference)
    assert {k.split("/")[0] for k in expected} == {"quantize", "tune", "merge", "evaluate"}

    for crash, stage in CRASHES:
        died = run(killed, crash)
        assert died.returncode == -signal.SIGKILL, f"{crash}: {died.stdout[-2000:]}{died.stderr[-2000:]}"
        half = list((killed / "stages" / stage).rglob("*.partial"))
        assert half, f"{crash}: no half-written {stage} folder left: the crash did not hit mid-write"
        assert not _finished(killed, stage), f"{crash}: {stage} was committed before the kill"
        # what is finished so far is byte for byte what the uninterrupted run has
        assert _weights(killed).items() <= expected.items(), crash

    final = run(killed)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "gate: PROMOTED to champion (tiny-qalora v1)" in final.stdout, final.stdout[-3000:]
    assert _weights(killed) == expected
    assert not list((killed / "stages").rglob("*.partial")) and not list((killed / "stages").rglob("*.old"))
    db = killed / "mlflow" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-qalora'")] == ["1"]
