"""MLflow tracking + registry gate against a real sqlite store, with tiny low-bit models built in code."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import save_tiny_base
from qalora.checkpoint import load_lowbit_model, load_tensors
from qalora.config import GateParams, Params, TrackingParams
from qalora.data import alpaca_prompt
from qalora.gate import decide
from tasks import mlflow_tracking as mt

MD5 = "d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One sqlite store under a temp $QALORA_HOME for the module (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("qalora_home")
    old_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QALORA_HOME", str(root))
        uri = mt.configure(TrackingParams())
        yield {"root": root, "uri": uri}
    mlflow.set_tracking_uri(old_uri)
    mlflow.set_registry_uri(old_uri)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two different low-bit model folders (different random weights)."""
    root = tmp_path_factory.mktemp("lowbit")
    return {seed: save_tiny_base(root / f"seed{seed}", seed=seed) for seed in (0, 1)}


def lineage(**kw):
    return {"git_sha": "0123abcd", "git_dirty": False, "data_md5": MD5, "params_hash": "ph1", "code_version": "cv1",
            "seed": 0, "versions": {"torch": torch.__version__}} | kw


def figures(**kw):
    return {"check.passed": 1.0, "check.logits.max_rel_error": 2.5e-7, "merge.max_abs_zero_shift": 0.03,
            "benchmark.decode_speedup.b1": 1.25, "eval.arc_easy.acc": 0.40, "eval.wiki.perplexity": 30.0} | kw


def run_and_register(name: str, folder: Path, figs: dict, gate=GateParams(), lin=None):
    """What the flow does: champion -> pipeline run -> decide -> register_and_gate."""
    tracking = TrackingParams(registered_model=name)
    current = mt.champion(name)
    lin = lin or lineage()
    with mt.pipeline_run(tracking, f"run-{name}", Params(), lin) as run:
        decision = decide(figs, current["figures"] if current else None, gate)
        result = mt.register_and_gate(run.run_id, folder, name, decision, figs, lin)
    return run.run_id, decision, result


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def reference_generation(folder: Path, prompt: str, max_new_tokens: int) -> str:
    model, tok, _ = load_lowbit_model(folder)
    ids = tok(alpaca_prompt(prompt), return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_configure_default_sqlite_store(home):
    root = home["root"]
    assert home["uri"] == f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    assert (root / "mlflow" / "mlflow.db").is_file()
    exp = MlflowClient().get_experiment_by_name("qalora")
    assert exp.artifact_location == (root / "mlflow" / "artifacts").as_uri()
    assert mt.configure(TrackingParams()) == home["uri"]  # idempotent


def test_pipeline_run_logs_params_stages_lineage_and_datasets(home, tmp_path):
    data = tmp_path / "train.json"
    data.write_text("[]")
    extra = tmp_path / "stage.json"
    extra.write_text(json.dumps({"k": 1}))
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.md").write_text("# r\n")
    p = Params()
    with mt.pipeline_run(TrackingParams(), "tracking-test", p, lineage()) as run:
        run.log_dataset("train", str(data), MD5, "training")
        child = run.log_stage("tune", {"final_loss": 1.5, "tune.steps": 40, "cached": False, "note": "x"},
                              artifacts=[extra], params={"lr": 2e-4}, series={"loss": [(1, 3.0), (2, 2.5), (3, 2.0)]})
        run.log_artifacts(folder, "report")
    client = MlflowClient()
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracking-test"
    assert parent.data.params["tune.lr"] == str(p.tune.lr)
    assert json.loads(parent.data.params["quantize.targets"]) == p.quantize.targets
    assert parent.data.params["tracking.tracking_uri"] == "null"
    tags = parent.data.tags
    assert tags["lineage.git_sha"] == "0123abcd" and tags["lineage.git_dirty"] == "false"
    assert tags["lineage.data_md5"] == MD5 and tags["lineage.params_hash"] == "ph1" and tags["seed"] == "0"
    assert tags["lineage.versions.torch"] == torch.__version__ and tags["mlflow.source.git.commit"] == "0123abcd"
    assert json.loads(tags["lineage"]) == lineage()
    assert parent.data.metrics == {"tune.final_loss": 1.5, "tune.steps": 40.0, "tune.cached": 0.0, "tune.loss": 2.0}
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "tune.loss")] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    stage = client.get_run(child)
    assert stage.info.run_name == "tune" and stage.data.tags["mlflow.parentRunId"] == run.run_id
    assert stage.data.metrics == {"final_loss": 1.5, "steps": 40.0, "cached": 0.0, "loss": 2.0}
    assert stage.data.params == {"lr": "0.0002"} and json.loads(stage.data.tags["skipped_metrics"]) == ["note"]
    assert [a.path for a in client.list_artifacts(child)] == ["stage.json"]
    assert [a.path for a in client.list_artifacts(run.run_id, "report")] == ["report/report.md"]
    assert parent.info.artifact_uri.startswith((home["root"] / "mlflow" / "artifacts").as_uri())
    (inp,) = parent.inputs.dataset_inputs
    assert inp.dataset.name == "train" and inp.dataset.digest == MD5
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert json.loads(inp.dataset.source)["uri"] == str(data.resolve())


def test_pipeline_run_ends_failed_on_exception(home):
    with pytest.raises(RuntimeError, match="tune diverged"):
        with mt.pipeline_run(TrackingParams(), "failing", Params(), lineage()) as run:
            raise RuntimeError("tune diverged")
    failed = MlflowClient().get_run(run.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["qalora.error"] == "RuntimeError: tune diverged"


def test_log_dataset_rejects_a_digest_that_is_not_a_dvc_md5(home, tmp_path):
    with pytest.raises(ValueError, match="not a DVC md5"):
        with mt.pipeline_run(TrackingParams(), "bad-digest", Params(), lineage()) as run:
            run.log_dataset("train", str(tmp_path), "f" * 64, "training")


def test_first_promotion_serves_lowbit_text(home, folders):
    name = "qalora-promote"
    assert mt.champion(name) is None
    figs = figures()
    run_id, decision, result = run_and_register(name, folders[0], figs)
    assert decision["passed"]
    assert result == {"version": "1", "decision": "promoted", "previous_champion": None, "champion": "1",
                      "model_uri": f"models:/{name}/1"}
    assert aliases(name) == {"champion": "1", "challenger": "1"}
    champ = mt.champion(name)
    assert champ == {"version": "1", "run_id": run_id, "figures": figs, "lineage": lineage()}
    client = MlflowClient()
    mv = client.get_model_version(name, "1")
    assert mv.tags["decision"] == "promoted" and mv.tags["gate.passed"] == "true" and mv.tags["gate.failed"] == ""
    assert mv.tags["figure.check.logits.max_rel_error"] == "2.5e-07" and mv.tags["lineage.data_md5"] == MD5
    assert mv.tags["gate.rule.no_regression"] == "pass value=None threshold=None: no champion yet"
    assert client.get_run(run_id).data.tags["qalora.decision"] == "promoted"

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    # The served weights are the low-bit folder's own tensors, loaded from safetensors.
    served = model.unwrap_python_model().model.state_dict()
    on_disk = load_tensors(folders[0])
    qweights = [k for k in on_disk if k.endswith(".qweight")]
    assert len(qweights) == 14 and all(torch.equal(served[k], on_disk[k]) for k in qweights)
    assert all(served[k].dtype == torch.uint8 for k in qweights)
    expected = reference_generation(folders[0], "Hello", 6)
    assert expected  # the tiny model does produce text
    assert model.predict(["Hello"], params={"max_new_tokens": 6}) == [expected]
    assert model.predict(pd.DataFrame({"prompt": ["Hello", "Hello"]}), params={"max_new_tokens": 6}) == [expected] * 2
    # Models from code: the logged model holds our source file and no pickle of our objects.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    assert (model_dir / "lowbit_pyfunc.py").is_file() and not list(model_dir.rglob("*.pkl"))
    assert (model_dir / "artifacts" / folders[0].name / "model.safetensors").is_file()


def test_rejection_then_second_promotion(home, folders):
    name = "qalora-lifecycle"
    client = MlflowClient()
    _, _, first = run_and_register(name, folders[0], figures())
    assert first["decision"] == "promoted"

    bad = figures(**{"check.passed": 0.0, "check.logits.max_rel_error": 5e-3, "eval.arc_easy.acc": 0.30})
    run_id, decision, second = run_and_register(name, folders[1], bad)
    assert decision["failed"] == ["bit_exact", "logit_error", "no_regression.eval.arc_easy.acc"]
    assert second == {"version": "2", "decision": "rejected", "previous_champion": "1", "champion": "1",
                      "model_uri": f"models:/{name}/2"}
    assert aliases(name) == {"champion": "1", "challenger": "2"}
    tags = client.get_model_version(name, "2").tags
    assert tags["decision"] == "rejected" and tags["gate.passed"] == "false"
    assert tags["gate.failed"] == "bit_exact,logit_error,no_regression.eval.arc_easy.acc"
    assert tags["gate.rule.bit_exact"].startswith("FAIL value=0.0 threshold=1.0: ")
    assert tags["gate.rule.logit_error"].startswith("FAIL value=0.005 threshold=0.001: ")
    assert tags["gate.rule.no_regression.eval.arc_easy.acc"].startswith("FAIL value=0.3 threshold=0.38")
    assert tags["gate.rule.no_regression.eval.wiki.perplexity"].startswith("pass value=30.0 threshold=30.6")
    assert {k: v for k, v in tags.items() if k.startswith("figure.")} == {f"figure.{k}": repr(v) for k, v in bad.items()}
    assert client.get_run(run_id).data.tags["qalora.decision"] == "rejected"
    assert mt.champion(name)["version"] == "1"

    better = figures(**{"eval.arc_easy.acc": 0.42, "eval.wiki.perplexity": 29.0})
    _, decision, third = run_and_register(name, folders[1], better, lin=lineage(git_sha="4567ef01"))
    assert decision["passed"] and [r["rule"] for r in decision["rules"]][3:] == [
        "no_regression.eval.arc_easy.acc", "no_regression.eval.wiki.perplexity"]
    assert third["version"] == "3" and third["decision"] == "promoted" and third["previous_champion"] == "1"
    assert aliases(name) == {"champion": "3", "challenger": "3", "previous-champion": "1"}
    old = client.get_model_version_by_alias(name, "previous-champion")
    assert str(old.version) == "1" and old.tags["superseded_by"] == "3" and old.tags["decision"] == "promoted"
    assert client.get_model_version(name, "3").tags["previous_champion"] == "1"
    champ = mt.champion(name)
    assert champ["version"] == "3" and champ["figures"] == better and champ["lineage"]["git_sha"] == "4567ef01"


def test_regate_promotes_a_rejected_version_and_keeps_the_champion(home, folders):
    name = "qalora-regate"
    client = MlflowClient()
    run_and_register(name, folders[0], figures())
    strict = GateParams(floors={"eval.arc_easy.acc": 0.5})
    _, decision, second = run_and_register(name, folders[1], figures(**{"eval.arc_easy.acc": 0.41}), gate=strict)
    assert second["decision"] == "rejected" and decision["failed"] == ["floor.eval.arc_easy.acc"]
    assert client.get_model_version(name, "2").tags["gate.rule.floor.eval.arc_easy.acc"].startswith("FAIL value=0.41 threshold=0.5")

    again = mt.regate(name, 2, strict)  # same rules, same answer, nothing moves
    assert again["decision"] == "rejected" and not again["passed"] and aliases(name)["champion"] == "1"

    result = mt.regate(name, "2", GateParams())  # the floor dropped: passes against champion v1
    assert result["passed"] and result["decision"] == "promoted" and result["previous_champion"] == "1"
    assert [r["rule"] for r in result["rules"]][3] == "no_regression.eval.arc_easy.acc"
    assert aliases(name) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    tags = client.get_model_version(name, "2").tags
    assert tags["decision"] == "promoted" and "gate.rule.floor.eval.arc_easy.acc" not in tags

    kept = mt.regate(name, "2", GateParams(max_perplexity=10.0))  # the champion is re-checked, never demoted here
    assert kept["decision"] == "kept" and kept["failed"] == ["max_perplexity.eval.wiki.perplexity"]
    assert aliases(name)["champion"] == "2"


def test_champion_of_an_unknown_model_is_none(home):
    assert mt.champion("no-such-model") is None
