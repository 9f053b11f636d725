"""Secrets stay out of every artifact: credentials planted in the environment (where MLflow, DVC remotes and
the hub read them) appear in no file the pipeline writes: stage folders, manifests, MLflow's database and
artifacts, Prefect's database, reports."""

from pathlib import Path

SECRETS = {
    "MLFLOW_TRACKING_TOKEN": "qalora-test-secret-mlflow-5f1c",
    "MLFLOW_TRACKING_PASSWORD": "qalora-test-secret-pass-77aa",
    "AWS_SECRET_ACCESS_KEY": "qalora-test-secret-aws-90b3",
    "HF_TOKEN": "hf_qaloraTestSecret4242",
}


def _files_containing(roots: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{path} holds {n.decode()}" for n in needles if n in data]
    return hits


def _prefect_db() -> Path:
    """The sqlite file of the Prefect server the flow reported to (flow runs, parameters, logs, artifacts)."""
    from prefect.settings import get_current_settings

    url = str(get_current_settings().server.database.connection_url.get_secret_value())
    path = Path(url.split(":///", 1)[1])
    assert path.is_file(), url
    return path


def test_planted_credentials_reach_no_artifact(project, prefect_server, state_dir, monkeypatch):
    from qalora_pipeline.flows.pipeline import qalora_pipeline

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    result = qalora_pipeline(params_file=str(project / "params.yaml"), project_dir=str(project))
    assert result["passed"]
    written = [state_dir / "stages", state_dir / "mlflow", project / "reports"]
    assert all(any(p.is_file() for p in root.rglob("*")) for root in written)  # the search has something to search
    hits = _files_containing(written + [state_dir, _prefect_db().parent], [v.encode() for v in SECRETS.values()])
    assert hits == []
