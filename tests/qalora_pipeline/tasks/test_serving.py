"""The champion served the way teams serve MLflow models: `mlflow models serve` on localhost answers a
POST with the completion the low-bit model itself generates, and a malformed request with a 4xx."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pytest

from conftest import save_tiny_base, wait_until_up
from qalora.config import GateParams, Params, TrackingParams
from qalora_pipeline import tracking as mt
from qalora_pipeline.flows.local_server import free_port

BIN = Path(sys.executable).parent
NAME = "served-model"
PROMPT = "Count to 3."


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champions_completion(tmp_path, state_dir):
    tracking = TrackingParams(registered_model=NAME)
    uri = mt.configure(tracking)
    folder = save_tiny_base(tmp_path / "model")
    lineage = {"data_md5": "d41d8cd98f00b204e9800998ecf8427e", "params_hash": "p", "code_version": "c"}
    with mt.pipeline_run(tracking, "serve-test", Params(), lineage) as run:
        figures = {"check.passed": 1.0, "check.logits.max_rel_error": 1e-7}
        assert mt.register_and_gate(run.run_id, folder, NAME, GateParams(), figures, lineage)["decision"] == "promoted"
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict([PROMPT], params={"max_new_tokens": 4})

    port = free_port()
    # What a user types (README): the venv's bin first on PATH (MLflow execs `uvicorn`), the registry URI in
    # the environment, the local Python environment.
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc)
        ok = httpx.post(f"{url}/invocations", json={"inputs": [PROMPT], "params": {"max_new_tokens": 4}}, timeout=120)
        assert ok.status_code == 200, ok.text
        assert ok.json()["predictions"] == expected and isinstance(expected[0], str)
        bad = httpx.post(f"{url}/invocations", content=b'{"inputs": [', headers={"Content-Type": "application/json"},
                         timeout=60)
        assert 400 <= bad.status_code < 500, (bad.status_code, bad.text)
        wrong = httpx.post(f"{url}/invocations", json={"instances": [{"prompt": 1}], "params": {"max_new_tokens": "x"}},
                           timeout=60)
        assert 400 <= wrong.status_code < 500, (wrong.status_code, wrong.text)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
