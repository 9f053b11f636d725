"""The whole flow on a tiny model and tiny data, with real Prefect, MLflow and DVC in a temp state dir:
a promotion, a rejection (reusing every cached stage), and a skipped scheduled run."""

import json
import subprocess

import pytest
import yaml

from conftest import tiny_llama, tiny_tokenizer, write_alpaca


@pytest.fixture
def project(tmp_path, state_dir):
    from tasks import dvc_data

    root = tmp_path / "project"
    data = root / "data"
    for sub in ("train", "calibration", "heldout", "eval"):
        (data / sub).mkdir(parents=True)
    write_alpaca(data / "train" / "alpaca_en_demo.json")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (data / "calibration" / "c4_demo.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(4)))
    (data / "heldout" / "wiki_demo.txt").write_text(text * 3)
    (data / "eval" / "README").write_text("no eval sets in this test: perplexity only\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc_data.track(root)
    fp = tmp_path / "fp"
    tiny_llama().save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    params = {
        "name": "tiny",
        "model": {"source": str(fp)},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
        "tune": {"steps": 2, "lr": 5e-3, "warmup_steps": 0, "save_every": 100},
        "check": {"prompts": ["hi"], "max_new_tokens": 3},
        "benchmark": {"batch_sizes": [1, 2], "decode_tokens": 2, "prefill_lengths": [8]},
        "evaluate": {"tasks": [], "perplexity": True, "perplexity_context": 32, "perplexity_max_tokens": 256},
        "tracking": {"registered_model": "tiny-qalora"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_promote_reject_and_skip(project, prefect_server):
    import mlflow

    from flows.pipeline import qalora_pipeline
    from tasks import mlflow_tracking

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
    from flows.pipeline import qalora_pipeline
    from tasks.dvc_data import DataVersionError

    (project / "data" / "train" / "alpaca_en_demo.json").write_text("[]")
    with pytest.raises(DataVersionError, match="does not match data.dvc.*qalora data build"):
        qalora_pipeline(params_file=str(project / "params.yaml"), project_dir=str(project))
