"""Scheduled retraining against a real Prefect server: `qalora serve` (on its own local server) fires its
schedule, skips a run whose inputs equal the champion's and retrains when data/ changes; `prefect deploy
--all` turns prefect.yaml into a work-pool deployment whose scheduled run a process worker executes."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
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


def _stop(proc: subprocess.Popen, timeout: float = 120, must_exit: bool = True) -> str:
    """SIGTERM ``proc`` and return its output once it and every process holding its stdout (the runs it
    started) have exited. Past ``timeout`` seconds the whole tree is killed; for our own ``qalora serve``
    (``must_exit``) that fails the test with what it printed. Prefect's ``prefect worker start`` is not
    ours: its shutdown took over 120 s on a loaded CI machine, so it is only cleaned up."""
    import psutil

    proc.terminate()
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in [*tree, psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out = proc.communicate()[0]
        if must_exit:
            raise AssertionError(f"{proc.args[1]} or a process it started still running {timeout:.0f} s after "
                                 f"SIGTERM: {out[-4000:]}") from None
        return out


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
        out = _stop(proc)
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"], out
    assert dep.parameters == {"params_file": str(params), "overrides": ["tune.steps=2"],
                              "project_dir": str(tmp_path.resolve()), "scheduled": True}


@pytest.mark.slow
def test_prefect_yaml_deploys_the_scheduled_pipeline_and_a_worker_runs_it(prefect_server, state_dir, tmp_path, project):
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="qalora-pool", type="process"), overwrite=True)
    # A copy of the project's deployment files, so the deploy cannot touch the checkout.
    shutil.copy(REPO / "prefect.yaml", tmp_path)
    shutil.copytree(REPO / "qalora_pipeline", tmp_path / "qalora_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=tmp_path,
                          env=env(prefect_server, state_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dep = deployment("qalora-scheduled")
    assert dep.work_pool_name == "qalora-pool"
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 3 * * 1", "UTC")]
    assert dep.parameters["scheduled"] is True and dep.parameters["params_file"] == "params/default.yaml"
    assert dep.entrypoint == "qalora_pipeline/flows/pipeline.py:qalora_pipeline"
    assert dep.global_concurrency_limit.limit == 1 and dep.concurrency_options.collision_strategy == "CANCEL_NEW"

    # A run scheduled on the deployment (tiny params instead of the weekly default) executes on a process worker.
    with get_client(sync_client=True) as client:
        scheduled = client.create_flow_run_from_deployment(
            dep.id, parameters={"params_file": str(project / "params.yaml"), "project_dir": str(project),
                                "scheduled": True},
            state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(seconds=5)))
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "qalora-pool"], cwd=tmp_path,
                              env=env(prefect_server, state_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        done = _wait_for(prefect_server, lambda r: r.id == scheduled.id and r.state.is_final(), 300, worker,
                         "run by the worker")
    finally:
        out = _stop(worker, timeout=60, must_exit=False)
    assert done.state_name == "Completed", out[-3000:]
    assert "PROMOTED" in _outcome(prefect_server, done)


@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *"])
def test_serve_rejects_a_bad_cron_expression(cron, state_dir, tmp_path):
    proc = subprocess.run([str(BIN / "qalora"), "serve", "--cron", cron, "--project-dir", str(tmp_path)],
                          env=os.environ | {"QALORA_HOME": str(state_dir)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--cron" in proc.stderr and repr(cron) in proc.stderr


def _runs(api_url: str, deployment_name: str | None = None) -> list:
    """Flow runs on the server at ``api_url`` (of one deployment when named), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        dep = DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])) if deployment_name else None
        return client.read_flow_runs(deployment_filter=dep, sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def _outcome(api_url: str, run) -> str:
    """The run's `qalora-run` artifact: "skipped: ..." or the gate decision."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return " ".join(str(a.data) for a in arts)


def _wait_for(api_url: str, predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[1]} exited ({proc.returncode}) while waiting for {what}: {proc.stdout.read()[-3000:]}")
        try:
            found = [r for r in _runs(api_url) if predicate(r)]
        except httpx.ConnectError:  # serve's server is still starting
            found = []
        if found:
            return found[0]
        time.sleep(3)
    states = [(r.name, r.state_name, str(r.expected_start_time)) for r in _runs(api_url)]
    raise AssertionError(f"no flow run {what} within {timeout:.0f} s; runs: {states}")


def _versions(name: str) -> list[str]:
    import mlflow

    from qalora.paths import state_dir

    uri = f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}"  # this test's registry, whatever an earlier one set
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


@pytest.mark.slow
def test_served_schedule_fires_skips_unchanged_inputs_and_retrains_on_new_data(project, prefect_server, state_dir):
    """`qalora serve` with no PREFECT_API_URL: its own server schedules runs, which execute and complete."""
    from conftest import write_alpaca
    from qalora_pipeline.flows.local_server import free_port
    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline import data_version as dvc_data

    params = str(project / "params.yaml")
    assert qalora_pipeline(params_file=params, project_dir=str(project))["passed"]  # v1: the champion
    assert _versions("tiny-qalora") == ["1"]

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    served_env = {k: v for k, v in env(prefect_server, state_dir).items() if k != "PREFECT_API_URL"}
    served_env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"  # Prefect's default is 60 s
    t0 = time.time()
    proc = subprocess.Popen(
        [str(BIN / "qalora"), "serve", "--interval", "20", "--name", "every-20s", "--params", params,
         "--project-dir", str(project), "--port", str(port)],
        env=served_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        skipped = _wait_for(api, lambda r: r.state_name == "Completed", 300, proc, "completed")
        assert skipped.deployment_id is not None and skipped.expected_start_time.timestamp() >= t0 - 30
        assert "skipped: data" in _outcome(api, skipped)
        assert _versions("tiny-qalora") == ["1"]  # nothing registered

        # New data (a new data.dvc md5): the next scheduled run retrains and goes through the gate.
        write_alpaca(project / "data" / "train" / "alpaca_en_demo.json", n=30)
        dvc_data.track(project)
        changed = time.time()
        retrained = _wait_for(api, lambda r: r.state_name == "Completed" and r.start_time is not None
                              and r.start_time.timestamp() > changed and "gate" in _outcome(api, r),
                              300, proc, "retrained")
        assert "PROMOTED" in _outcome(api, retrained) or "REJECTED" in _outcome(api, retrained)
        assert _versions("tiny-qalora") == ["1", "2"]
        runs = _runs(api)
        for r in runs:  # what happened, for `pytest -s` readers: name, state, due, started, outcome
            started = f"{r.start_time:%H:%M:%S}" if r.start_time else "-"
            print(f"{r.name:24s} {r.state_name:10s} due {r.expected_start_time:%H:%M:%S} started {started}",
                  _outcome(api, r)[:80])
        states = {r.state_name for r in runs}
        assert "Failed" not in states and "Crashed" not in states, states
    finally:
        out = _stop(proc)
    assert f"local Prefect server (API, scheduler, UI) at http://127.0.0.1:{port}" in out
    with pytest.raises(OSError):  # serve stopped its server
        import urllib.request

        urllib.request.urlopen(f"{api}/health", timeout=5)


@pytest.mark.slow
def test_stopping_serve_mid_run_exits_promptly_and_leaves_nothing_running(project, prefect_server, state_dir):
    """SIGTERM to `qalora serve` while a scheduled run is tuning: serve and its run stop within a bounded
    time (the run's process does not outlive serve), the run is not left 'Running', nothing is registered."""
    from qalora_pipeline.flows.local_server import free_port

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    served_env = {k: v for k, v in env(prefect_server, state_dir).items() if k != "PREFECT_API_URL"}
    served_env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"
    proc = subprocess.Popen(
        [str(BIN / "qalora"), "serve", "--interval", "20", "--name", "every-20s", "--params",
         str(project / "params.yaml"), "--set", "tune.steps=100000", "--project-dir", str(project),
         "--port", str(port)],
        env=served_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        running = _wait_for(api, lambda r: r.state_name == "Running", 300, proc, "running")
        time.sleep(15)  # well into the stages
    finally:
        t0 = time.monotonic()
        out = _stop(proc)
    stopped_in = time.monotonic() - t0
    print(f"serve stopped {stopped_in:.1f} s after SIGTERM (exit code {proc.returncode})")
    assert proc.returncode == 0, out[-4000:]
    assert _versions("tiny-qalora") == []
    # The server is gone with serve; what it recorded stays in its database: restart one to read it.
    from qalora_pipeline.flows.local_server import local_server
    with local_server(state_dir / "prefect") as server:
        final = next(r for r in _runs(server.url) if r.id == running.id)
    print(f"the run stopped mid-way ends {final.state_name}: {final.state.message}")
    assert final.state_name in ("Crashed", "Cancelled", "Failed"), (final.state_name, out[-4000:])
