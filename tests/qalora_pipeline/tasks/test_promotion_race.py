"""Two pipeline runs gating at the same moment against one `mlflow server` (localhost, sqlite backend):
they are decided one after the other, each against the champion of its moment, so the champion that
ends up serving is the one the rule chooses whatever the timing, and the other says why it is not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import save_tiny_base, wait_until_up
from qalora_pipeline.flows.local_server import free_port

BIN = Path(sys.executable).parent
NAME = "race-model"
FIGURES = {"check.passed": 1.0, "check.logits.max_rel_error": 1e-7}

# One pipeline run's registration, as the flow does it, in its own process.
RUN = """
import json, sys
from qalora.config import GateParams, Params, TrackingParams
from qalora_pipeline import tracking as mt
uri, folder, name, figures = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tracking = TrackingParams(tracking_uri=uri, registered_model=name)
mt.configure(tracking)
lineage = {"data_md5": "d41d8cd98f00b204e9800998ecf8427e", "params_hash": sys.argv[5], "code_version": "cv"}
with mt.pipeline_run(tracking, "race-" + sys.argv[5], Params(), lineage) as run:
    result = mt.register_and_gate(run.run_id, folder, name, GateParams(), figures, lineage)
print(json.dumps({k: result[k] for k in ("version", "decision", "previous_champion")}))
"""


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(f"{url}/health", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _register(uri: str, folder: Path, ppl: float, tag: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, uri, str(folder), NAME,
                             json.dumps(FIGURES | {"eval.wiki_ppl.perplexity": ppl}), tag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_runs_gating_at_once_end_with_the_champion_the_rule_chooses(mlflow_server, tmp_path):
    folders = [save_tiny_base(tmp_path / f"m{i}", seed=i) for i in range(3)]
    assert _finish(_register(mlflow_server, folders[0], 30.0, "first"))["decision"] == "promoted"  # v1

    # A (perplexity 20) beats v1 and B; B (25) beats v1 but not A. Started together.
    a, b = _register(mlflow_server, folders[1], 20.0, "a"), _register(mlflow_server, folders[2], 25.0, "b")
    ra, rb = _finish(a), _finish(b)

    client = MlflowClient(mlflow_server, mlflow_server)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == ra["version"]  # A, in either order
    assert ra["decision"] == "promoted"
    vb = client.get_model_version(NAME, rb["version"])
    if rb["previous_champion"] == ra["version"]:  # B decided second: against A, and says why it lost
        assert rb["decision"] == "rejected" and vb.tags["gate.against"] == f"v{ra['version']}"
        assert "no_regression.eval.wiki_ppl.perplexity" in vb.tags["gate.failed"]
    else:  # B decided first: promoted over v1, then A was decided against B and replaced it
        assert rb["decision"] == "promoted" and rb["previous_champion"] == "1"
        assert ra["previous_champion"] == rb["version"] and vb.tags["superseded_by"] == ra["version"]
    # Each move replaced the champion of its moment: the audit log is one unbroken chain.
    audit = client.get_registered_model(NAME).tags["audit_log"].removeprefix("runs:/").split("/", 1)[0]
    path = client.download_artifacts(audit, "registry_audit.jsonl", str(tmp_path))
    moves = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [m["replaced"] for m in moves] == [None, *[m["version"] for m in moves[:-1]]]
    assert moves[-1]["version"] == ra["version"]
    assert not [m for m in client.search_registered_models() if m.name.endswith(".champion-lock")]  # released
