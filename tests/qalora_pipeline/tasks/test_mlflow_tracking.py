"""MLflow tracking + registry gate against a real sqlite store, with tiny low-bit models built in code."""

import datetime as dt
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import save_tiny_base
from qalora_pipeline.cli import main
from qalora.checkpoint import load_lowbit_model, load_tensors
from qalora.config import GateParams, Params, TrackingParams
from qalora.data import alpaca_prompt
from qalora.manifest import sha256_file
from qalora_pipeline import tracking as mt

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
    """Three different low-bit model folders (different random weights)."""
    root = tmp_path_factory.mktemp("lowbit")
    return {seed: save_tiny_base(root / f"seed{seed}", seed=seed) for seed in (0, 1, 2)}


def lineage(**kw):
    return {"git_sha": "0123abcd", "git_dirty": False, "data_md5": MD5, "params_hash": "ph1", "code_version": "cv1",
            "seed": 0, "versions": {"torch": torch.__version__}} | kw


def figures(**kw):
    return {"check.passed": 1.0, "check.logits.max_rel_error": 2.5e-7, "merge.max_abs_zero_shift": 0.03,
            "benchmark.decode_speedup.b1": 1.25, "eval.arc_easy.acc": 0.40, "eval.wiki_ppl.perplexity": 30.0} | kw


def run_and_register(name: str, folder: Path, figs: dict, gate=GateParams(), lin=None):
    """What the flow does: pipeline run -> register_and_gate (which decides against the champion)."""
    tracking = TrackingParams(registered_model=name)
    lin = lin or lineage()
    with mt.pipeline_run(tracking, f"run-{name}", Params(), lin) as run:
        result = mt.register_and_gate(run.run_id, folder, name, gate, figs, lin)
    return run.run_id, result.pop("gate"), result


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
    assert champ == {"version": "1", "run_id": run_id, "figures": figs, "answers": None, "lineage": lineage()}
    client = MlflowClient()
    mv = client.get_model_version(name, "1")
    assert mv.tags["decision"] == "promoted" and mv.tags["gate.passed"] == "true" and mv.tags["gate.failed"] == ""
    assert mv.tags["gate.rules"] == "4/4 passed" and mv.tags["gate.against"] == "no champion"
    assert mv.tags["lineage.data_md5"] == MD5 and json.loads(mv.tags["lineage"]) == lineage()
    assert mv.tags["weights_sha256"] == sha256_file(folders[0] / "model.safetensors")
    assert mv.tags["promoted_via"] == "gate" and mv.tags["promotion_reason"] == f"pipeline run {run_id} passed the gate"
    # Figures live on the run, not as version tags; passing rules only in the decision artifact.
    assert not [k for k in mv.tags if k.startswith(("figure.", "gate.rule."))]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/gate/figures.json") == figs
    stored = mlflow.artifacts.load_dict(f"runs:/{run_id}/gate/decision.json")["decision"]
    assert [r["rule"] for r in stored["rules"]] == ["bit_exact", "logit_error", "decode_speedup", "no_regression"]
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
    assert {k for k in tags if k.startswith("gate.rule.")} == {f"gate.rule.{r}" for r in decision["failed"]}
    assert tags["gate.rules"] == "2/5 passed" and tags["gate.against"] == "v1" and "promoted_via" not in tags
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/gate/figures.json") == bad
    assert client.get_run(run_id).data.tags["qalora.decision"] == "rejected"
    assert mt.champion(name)["version"] == "1"

    better = figures(**{"eval.arc_easy.acc": 0.42, "eval.wiki_ppl.perplexity": 29.0})
    _, decision, third = run_and_register(name, folders[1], better, lin=lineage(git_sha="4567ef01"))
    assert decision["passed"] and [r["rule"] for r in decision["rules"]][3:] == [
        "no_regression.eval.arc_easy.acc", "no_regression.eval.wiki_ppl.perplexity"]
    assert third["version"] == "3" and third["decision"] == "promoted" and third["previous_champion"] == "1"
    assert aliases(name) == {"champion": "3", "challenger": "3", "previous-champion": "1"}
    old = client.get_model_version_by_alias(name, "previous-champion")
    assert str(old.version) == "1" and old.tags["superseded_by"] == "3" and old.tags["decision"] == "promoted"
    assert client.get_model_version(name, "3").tags["previous_champion"] == "1"
    champ = mt.champion(name)
    assert champ["version"] == "3" and champ["figures"] == better and champ["lineage"]["git_sha"] == "4567ef01"


def registry_state(name: str) -> dict:
    """Everything a gate check could change: aliases, every version's tags and update time, the audit log."""
    client = MlflowClient()
    versions = {str(mv.version): (dict(mv.tags), mv.last_updated_timestamp)
                for mv in client.search_model_versions(f"name = '{name}'")}
    return {"aliases": aliases(name), "versions": versions, "model_tags": dict(client.get_registered_model(name).tags),
            "audit": mt.audit_log(name)}


def assert_champion_serves(name: str, version: str, folder: Path) -> None:
    """``models:/name@champion`` loads the version the registry names: the weights file it serves hashes to
    that version's ``weights_sha256`` (and the folder's), and the pyfunc came from that version's run."""
    mv = MlflowClient().get_model_version_by_alias(name, "champion")
    assert str(mv.version) == version
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    served = model.unwrap_python_model().identity["weights_sha256"]
    assert served == mv.tags["weights_sha256"] == sha256_file(folder / "model.safetensors")
    assert model.metadata.run_id == mv.run_id


@pytest.fixture
def actor(monkeypatch):
    """A known login name for getpass (LOGNAME wins over USER)."""
    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setenv("USER", "alice")
    return "alice"


@pytest.fixture
def cli_env():
    """The orchestration subcommands set env defaults (PREFECT_HOME, ...) for the process: undo them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def two_champions(name: str, folders) -> tuple[str, str]:
    """The issue's registry: v1 promoted, then v2 promoted over it. Returns both runs' ids."""
    run1, _, first = run_and_register(name, folders[0], figures())
    run2, _, second = run_and_register(name, folders[1], figures(**{"eval.arc_easy.acc": 0.41}))
    assert (first["decision"], second["decision"]) == ("promoted", "promoted")
    assert aliases(name) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    return run1, run2


def test_gate_is_read_only(home, folders, actor, cli_env, capsys):
    name = "qalora-readonly"
    two_champions(name, folders)
    before = registry_state(name)
    assert [e["version"] for e in before["audit"]] == ["1", "2"]

    # The issue: re-checking v1 printed "promoted" and moved champion back to it. Now it only says so.
    check = mt.gate_version(name, 1, GateParams())
    assert check["passed"] and check["would"] == "promote" and check["version"] == "1"
    assert check["champion"] == "2" and check["compared_with"] == "2"
    assert [r["rule"] for r in check["rules"]] == ["bit_exact", "logit_error", "decode_speedup",
                                                   "no_regression.eval.arc_easy.acc",
                                                   "no_regression.eval.wiki_ppl.perplexity"]
    assert registry_state(name) == before

    # A failing check (exit 1 through the CLI) changes nothing either.
    failing = mt.gate_version(name, "models:/qalora-readonly@previous-champion", GateParams(floors={"eval.arc_easy.acc": 0.5}))
    assert failing["version"] == "1" and failing["would"] == "reject" and failing["failed"] == ["floor.eval.arc_easy.acc"]
    champ = mt.gate_version(name, "@champion", GateParams(max_perplexity=10.0))
    assert champ["would"] == "keep" and champ["compared_with"] is None  # the champion is not compared with itself
    assert champ["failed"] == ["max_perplexity.eval.wiki_ppl.perplexity"]
    assert registry_state(name) == before

    params = str(Path(__file__).resolve().parents[3] / "params" / "default.yaml")
    argv = ["gate", "--params", params, "--set", f"tracking.registered_model={name}"]
    assert main([*argv, "--version", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["would"] == "promote" and printed["champion"] == "2" and len(printed["rules"]) == 5
    assert main([*argv, "--version", "1", "--set", "gate.floors={eval.arc_easy.acc: 0.5}"]) == 1
    assert json.loads(capsys.readouterr().out)["failed"] == ["floor.eval.arc_easy.acc"]
    assert registry_state(name) == before
    assert_champion_serves(name, "2", folders[1])


def test_promote_and_rollback_are_explicit_recorded_and_served(home, folders, actor):
    name = "qalora-promote-rollback"
    client = MlflowClient()
    run1, run2 = two_champions(name, folders)
    assert_champion_serves(name, "2", folders[1])
    # v3 regresses: the pipeline rejects it, and promote refuses it without --force.
    run3, _, third = run_and_register(name, folders[2], figures(**{"eval.arc_easy.acc": 0.30}))
    assert third["decision"] == "rejected" and aliases(name)["champion"] == "2"
    before = registry_state(name)
    with pytest.raises(mt.PromotionRefused, match=r"refusing to promote qalora-promote-rollback v3: it fails the "
                       r"gate against champion v2 \(no_regression.eval.arc_easy.acc: .*\); pass --force"):
        mt.promote(name, 3, GateParams(), reason="try it")
    with pytest.raises(mt.RegistryError, match="--reason is empty"):
        mt.promote(name, 3, GateParams(), reason="  ", force=True)
    with pytest.raises(mt.RegistryError, match="version 2 of 'qalora-promote-rollback' is already the champion"):
        mt.promote(name, "champion", GateParams(), reason="again")
    assert registry_state(name) == before
    audit_run = before["model_tags"]["audit_log"].removeprefix("runs:/").split("/")[0]
    raw = [mlflow.artifacts.load_text(f"runs:/{audit_run}/registry_audit.jsonl")]

    forced = mt.promote(name, 3, GateParams(), reason="hotfix for the demo, accuracy checked by hand", force=True)
    assert forced["action"] == "promote --force" and forced["replaced"] == "2" and forced["by"] == "alice"
    assert forced["decision"]["failed"] == ["no_regression.eval.arc_easy.acc"]
    assert aliases(name) == {"champion": "3", "challenger": "3", "previous-champion": "2"}
    v3 = client.get_model_version(name, "3").tags
    assert (v3["promoted_via"], v3["promoted_by"], v3["previous_champion"], v3["promotion_forced"]) == (
        "promote --force", "alice", "2", "true")
    assert v3["promotion_reason"] == "hotfix for the demo, accuracy checked by hand" and v3["decision"] == "promoted"
    assert v3["gate.failed"] == "no_regression.eval.arc_easy.acc" and v3["gate.against"] == "v2"
    assert client.get_model_version(name, "2").tags["superseded_by"] == "3"
    assert_champion_serves(name, "3", folders[2])
    raw.append(mlflow.artifacts.load_text(f"runs:/{audit_run}/registry_audit.jsonl"))

    back = mt.rollback(name, reason="v3 answers worse in production")
    assert (back["action"], back["version"], back["replaced"], back["by"]) == ("rollback", "2", "3", "alice")
    assert aliases(name) == {"champion": "2", "challenger": "3"}  # the rollback consumed previous-champion
    v3 = client.get_model_version(name, "3").tags
    assert (v3["rolled_back_by"], v3["rolled_back_reason"], v3["superseded_by"]) == (
        "alice", "v3 answers worse in production", "2")
    v2 = client.get_model_version(name, "2").tags
    assert (v2["promoted_via"], v2["previous_champion"]) == ("rollback", "3")
    assert_champion_serves(name, "2", folders[1])
    raw.append(mlflow.artifacts.load_text(f"runs:/{audit_run}/registry_audit.jsonl"))
    with pytest.raises(mt.RegistryError, match="'qalora-promote-rollback' has no previous-champion alias to roll "
                                               "back to \\(champion is v2"):
        mt.rollback(name, reason="once more")

    by_hand = mt.promote(name, "1", GateParams(), reason="back to the first build")  # passes: no --force needed
    assert by_hand["action"] == "promote" and by_hand["replaced"] == "2" and by_hand["decision"]["passed"]
    assert aliases(name) == {"champion": "1", "challenger": "3", "previous-champion": "2"}
    v1 = client.get_model_version(name, "1").tags  # its first stint's end is history now (in the audit log)
    assert v1["promoted_via"] == "promote" and not {"promotion_forced", "superseded_by", "champion_until"} & set(v1)
    assert_champion_serves(name, "1", folders[0])
    raw.append(mlflow.artifacts.load_text(f"runs:/{audit_run}/registry_audit.jsonl"))

    log = mt.audit_log(name)
    assert [(e["action"], e["version"], e["replaced"]) for e in log] == [
        ("gate", "1", None), ("gate", "2", "1"), ("promote --force", "3", "2"), ("rollback", "2", "3"),
        ("promote", "1", "2")]
    assert [e["reason"] for e in log] == [f"pipeline run {run1} passed the gate", f"pipeline run {run2} passed the gate",
                                          "hotfix for the demo, accuracy checked by hand",
                                          "v3 answers worse in production", "back to the first build"]
    assert {e["by"] for e in log} == {"alice"} and [e["run_id"] for e in log[2:]] == [run3, run2, run1]
    assert [e["weights_sha256"] for e in log[2:]] == [sha256_file(folders[i] / "model.safetensors") for i in (2, 1, 0)]
    assert all(dt.datetime.fromisoformat(e["at"]).utcoffset() == dt.timedelta(0) for e in log)
    assert "gate" not in log[3] and log[4]["gate"] == {"passed": True, "failed": [], "against": "2"}
    # Append-only: each action extended the file, never rewrote an earlier line.
    assert all(later.startswith(earlier) and len(later.splitlines()) == len(earlier.splitlines()) + 1
               for earlier, later in zip(raw, raw[1:]))
    audit = client.get_run(audit_run)
    assert audit.data.tags["qalora.kind"] == "registry-audit" and audit.info.run_name == f"registry-audit-{name}"


def test_promote_and_rollback_cli(home, folders, actor, cli_env, capsys):
    name = "qalora-cli-promote"
    two_champions(name, folders)
    params = str(Path(__file__).resolve().parents[3] / "params" / "default.yaml")
    common = ["--params", params, "--set", f"tracking.registered_model={name}"]
    assert main(["rollback", *common, "--reason", "bad answers"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    assert aliases(name) == {"champion": "1", "challenger": "2"}
    assert main(["rollback", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qalora rollback: error: 'qalora-cli-promote' has no previous-champion alias") and "\n" not in err
    strict = ["--set", "gate.floors={eval.arc_easy.acc: 0.405}"]  # v2 (0.41) passes, v1 (0.40) would not
    assert main(["promote", *common, *strict, "--version", "models:/qalora-cli-promote@challenger",
                 "--reason", "fixed serving"]) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == "1"
    assert aliases(name) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    assert main(["promote", *common, *strict, "--version", "1", "--reason", "compare"]) == 2
    assert "refusing to promote qalora-cli-promote v1" in capsys.readouterr().err
    assert aliases(name)["champion"] == "2"
    assert main(["promote", *common, *strict, "--version", "1", "--reason", "compare", "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "promote --force"
    assert aliases(name) == {"champion": "1", "challenger": "2", "previous-champion": "2"}
    v1 = MlflowClient().get_model_version(name, "1").tags
    assert (v1["promotion_forced"], v1["promoted_by"], v1["gate.failed"]) == ("true", "alice", "floor.eval.arc_easy.acc")
    v2 = MlflowClient().get_model_version(name, "2").tags  # rolled back, champion again, superseded by v1
    assert v2["superseded_by"] == "1" and v2["promotion_reason"] == "fixed serving" and "rolled_back_by" not in v2
    with pytest.raises(SystemExit):  # argparse: --reason is required
        main(["promote", *common, "--version", "2"])
    assert [e["action"] for e in mt.audit_log(name)] == ["gate", "gate", "rollback", "promote", "promote --force"]
    assert_champion_serves(name, "1", folders[0])


def test_version_references_and_errors(home, folders):
    name = "qalora-refs"
    two_champions(name, folders)
    client = MlflowClient()
    for ref, version in [(2, "2"), ("1", "1"), ("champion", "2"), ("@previous-champion", "1"),
                         (f"models:/{name}@challenger", "2"), (f"models:/{name}/1", "1")]:
        assert str(mt.resolve_version(client, name, ref).version) == version, ref
    with pytest.raises(mt.RegistryError, match=r"version 7 of 'qalora-refs' does not exist; valid: versions 1, 2; "
                                               r"aliases challenger=v2, champion=v2, previous-champion=v1"):
        mt.gate_version(name, 7, GateParams())
    with pytest.raises(mt.RegistryError, match=r"alias 'prod' is not set on 'qalora-refs'; valid: versions 1, 2"):
        mt.promote(name, "prod", GateParams(), reason="x")
    with pytest.raises(mt.RegistryError, match=r"names registered model 'other', but tracking.registered_model is "
                                               r"'qalora-refs' \(pass --set tracking.registered_model=other\)"):
        mt.gate_version(name, "models:/other@champion", GateParams())
    with pytest.raises(mt.RegistryError, match=r"registered model 'nothing-here' does not exist"):
        mt.rollback("nothing-here")
    with pytest.raises(mt.RegistryError, match=r"registered model 'nothing-here' does not exist"):
        mt.gate_version("nothing-here", 1, GateParams())


def test_version_tags_hold_decision_failed_rules_and_lineage_not_every_figure(home, folders):
    """~200 figures (every MMLU subject, 2 questions each): the version keeps a readable handful of tags."""
    name = "qalora-tags"
    subjects = [f"mmlu_subject{i:02d}" for i in range(57)]
    def evaluated(acc: float, subject_acc: float) -> dict:
        figs = figures(**{"eval.mmlu.acc": acc, **{f"eval.{g}.acc": acc for g in
                          ("mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")}})
        figs |= {f"eval.{s}.acc": subject_acc for s in subjects} | {f"eval.{s}.acc_stderr": 0.5 for s in subjects}
        return figs | {f"eval.{s}.n": 2.0 for s in subjects}
    run_and_register(name, folders[0], evaluated(0.30, 1.0))
    run_id, decision, result = run_and_register(name, folders[1], evaluated(0.25, 0.0))
    assert len(evaluated(0.3, 1.0)) > 170
    # Every subject dropped from 100% to 0%: not a rule. MMLU overall and the groups dropped 0.05: rules.
    assert decision["failed"] == ["no_regression.eval.mmlu.acc", "no_regression.eval.mmlu_humanities.acc",
                                  "no_regression.eval.mmlu_other.acc", "no_regression.eval.mmlu_social_sciences.acc",
                                  "no_regression.eval.mmlu_stem.acc"]
    tags = MlflowClient().get_model_version(name, result["version"]).tags
    assert len(tags) <= 25, sorted(tags)
    assert not [k for k in tags if k.startswith("figure.") or "subject" in k]
    assert {k for k in tags if k.startswith("gate.rule.")} == {f"gate.rule.{r}" for r in decision["failed"]}
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/gate/figures.json")["eval.mmlu_subject03.acc"] == 0.0


def test_champion_of_an_unknown_model_is_none(home):
    assert mt.champion("no-such-model") is None
