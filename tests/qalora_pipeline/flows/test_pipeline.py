"""The whole flow on a tiny model and tiny data, with real Prefect, MLflow and DVC in a temp state dir:
a promotion, a rejection (reusing every cached stage), and a skipped scheduled run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest



def test_promote_reject_and_skip(project, prefect_server):
    import mlflow

    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline import tracking as mlflow_tracking

    params = str(project / "params.yaml")
    first = qalora_pipeline(params_file=params, project_dir=str(project))
    assert first["passed"] and not first["skipped"] and first["cached"] == []
    assert first["message"].startswith(f"gate: PROMOTED to champion (tiny-qalora v{first['version']})")
    assert (project / "reports" / first["run_name"] / "report.md").is_file()
    assert first["figures"]["check.passed"] == 1.0 and first["figures"]["check.logits.max_rel_error"] <= 1e-3
    assert not any(k.startswith("check.max_") for k in first["figures"])  # each figure once, under check.logits.*
    assert first["figures"]["benchmark.decode_tok_s.lowbit.b1"] > 0 and "benchmark.decode_speedup.b2" in first["figures"]
    assert "eval.wiki_ppl.perplexity" in first["figures"]
    assert not any(k.startswith("evaluate.") for k in first["figures"])  # each figure once, under eval.*

    champ = mlflow_tracking.champion("tiny-qalora")
    assert champ["version"] == first["version"]
    model = mlflow.pyfunc.load_model("models:/tiny-qalora@champion")
    assert isinstance(model.predict(["Count to 3."])[0], str)

    # An impossible floor rejects the candidate; every earlier stage is reused from the cache.
    second = qalora_pipeline(params_file=params, overrides=["gate.floors={check.passed: 2.0}"],
                             project_dir=str(project))
    assert not second["passed"]
    assert "gate: REJECTED" in second["message"] and "FAIL floor.check.passed" in second["message"]
    assert second["message"].endswith(f"report: {second['report']}")
    assert set(second["cached"]) == {"quantize", "tune", "merge", "check", "benchmark", "evaluate"}
    assert mlflow_tracking.champion("tiny-qalora")["version"] == first["version"]
    version = mlflow.MlflowClient().get_model_version("tiny-qalora", second["version"])
    assert version.tags.get("decision") == "rejected"

    # A scheduled run with the champion's data, code and params is skipped.
    third = qalora_pipeline(params_file=params, project_dir=str(project), scheduled=True)
    assert third["skipped"] and third["champion"] == first["version"]


def test_refuses_data_not_matching_dvc(project, prefect_server):
    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline.data_version import DataVersionError

    (project / "data" / "train" / "alpaca_en_demo.json").write_text("[]")
    with pytest.raises(DataVersionError, match="does not match data.dvc.*qalora data build"):
        qalora_pipeline(params_file=str(project / "params.yaml"), project_dir=str(project))


def test_rebuild_reproduces_the_registered_bytes_and_explains_a_difference(project, prefect_server, state_dir):
    """`qalora rebuild` re-runs a registered version from its lineage: same process kind -> identical bytes;
    a process on another CPU code path -> exit 1 naming the first differing file and the numeric fact."""
    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline import rebuild

    first = qalora_pipeline(params_file=str(project / "params.yaml"), project_dir=str(project))
    same = rebuild.rebuild("tiny-qalora", "champion", project, progress=False)
    assert same["identical"] and same["version"] == str(first["version"]), same["files"]
    compared = {r["file"] for r in same["files"] if r["compared"]}
    assert {"quantize/model.safetensors", "tune/adapter.safetensors", "merge/model.safetensors"} <= compared
    assert same["served_weights_match"]

    # The same version rebuilt on ATen's scalar kernels (the CPU path an old CPU would take): other bytes.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "qalora"), "rebuild", "--version", f"models:/tiny-qalora/{first['version']}",
         "--params", str(project / "params.yaml"), "--project-dir", str(project), "--no-progress"],
        env=os.environ | {"QALORA_HOME": str(state_dir), "QALORA_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIFFERENT: first differing file tune/adapter.safetensors" in proc.stdout, proc.stdout
    assert "explained by numerics.cpu_capability: recorded" in proc.stdout and "here 'DEFAULT'" in proc.stdout


def test_a_second_training_run_on_one_state_dir_is_refused(state_dir):
    from qalora_pipeline.flows.pipeline import state_lock

    with state_lock():
        with pytest.raises(RuntimeError, match=r"another pipeline run is training on .* \(pid \d+ since"):
            with state_lock():
                pass
    with state_lock():  # released: the next run proceeds
        pass
