"""Scheduled retraining against a real Prefect server: `qalora serve --cron` registers a cron deployment
of the pipeline and keeps serving it; `prefect deploy --all` turns prefect.yaml into a work-pool deployment."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def deployment(name: str, timeout: float = 0):
    """Read ``qalora-pipeline/<name>`` from the server, waiting up to ``timeout`` seconds for it to appear."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(f"qalora-pipeline/{name}")
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def env(prefect_server: str, state_dir: Path) -> dict[str, str]:
    return os.environ | {"PREFECT_API_URL": prefect_server, "QALORA_HOME": str(state_dir)}


def test_serve_registers_a_cron_deployment_of_the_pipeline(prefect_server, state_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("name: served\n")
    proc = subprocess.Popen(
        [str(BIN / "qalora"), "serve", "--cron", "0 3 * * 1", "--name", "served-test", "--params", str(params),
         "--set", "tune.steps=2", "--project-dir", str(tmp_path)],
        env=env(prefect_server, state_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        dep = deployment("served-test", timeout=150)
        assert proc.poll() is None, "serve must keep running to execute the scheduled runs"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"], out
    assert dep.parameters == {"params_file": str(params), "overrides": ["tune.steps=2"],
                              "project_dir": str(tmp_path.resolve()), "scheduled": True}


def test_prefect_yaml_deploys_the_scheduled_pipeline_on_its_work_pool(prefect_server, state_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="qalora-pool", type="process"), overwrite=True)
    # A copy of the project's deployment files, so the deploy cannot touch the checkout.
    shutil.copy(REPO / "prefect.yaml", tmp_path)
    shutil.copytree(REPO / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=tmp_path,
                          env=env(prefect_server, state_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dep = deployment("qalora-scheduled")
    assert dep.work_pool_name == "qalora-pool"
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 3 * * 1", "UTC")]
    assert dep.parameters["scheduled"] is True and dep.parameters["params_file"] == "params/default.yaml"
    assert dep.entrypoint == "flows/pipeline.py:qalora_pipeline"


@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *"])
def test_serve_rejects_a_bad_cron_expression(cron, state_dir, tmp_path):
    proc = subprocess.run([str(BIN / "qalora"), "serve", "--cron", cron, "--project-dir", str(tmp_path)],
                          env=os.environ | {"QALORA_HOME": str(state_dir)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--cron" in proc.stderr and repr(cron) in proc.stderr
