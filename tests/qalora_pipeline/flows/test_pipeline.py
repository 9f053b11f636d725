"""The whole flow on a tiny model and tiny data, with real Prefect, MLflow and DVC in a temp state dir:
a promotion, a rejection (reusing every cached stage), and a skipped scheduled run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EVAL_DATA, REPO


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
    # The baselines, scored on the same text: what quantization cost and what tuning bought.
    f = first["figures"]
    fp, base, merged = (f[f"{m}.wiki_ppl.perplexity"] for m in ("eval_fp", "eval_base", "eval"))
    assert len({fp, base, merged}) == 3  # three different models
    assert f["delta.quantization.wiki_ppl.perplexity"] == pytest.approx(base - fp)
    assert f["delta.tuning.wiki_ppl.perplexity"] == pytest.approx(merged - base)
    md = (project / "reports" / first["run_name"] / "report.md").read_text()
    assert "## What quantization cost and tuning bought" in md and "](baselines.png)" in md
    run = mlflow.get_run(mlflow.MlflowClient().get_model_version("tiny-qalora", first["version"]).run_id)
    assert {"evaluate_fp.wiki_ppl/perplexity", "evaluate_base.wiki_ppl/perplexity",
            "delta.tuning.wiki_ppl.perplexity"} <= set(run.data.metrics)

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
    assert set(second["cached"]) == {"quantize", "tune", "merge", "check", "benchmark", "evaluate", "evaluate_fp",
                                     "evaluate_base"}
    assert mlflow_tracking.champion("tiny-qalora")["version"] == first["version"]
    version = mlflow.MlflowClient().get_model_version("tiny-qalora", second["version"])
    assert version.tags.get("decision") == "rejected"

    # A scheduled run with the champion's data, code and params is skipped.
    third = qalora_pipeline(params_file=params, project_dir=str(project), scheduled=True)
    assert third["skipped"] and third["champion"] == first["version"]

    # Another tune of the same base: the baselines are not scored again.
    fourth = qalora_pipeline(params_file=params, overrides=["tune.lr=0.001"], project_dir=str(project))
    assert {"quantize", "evaluate_fp", "evaluate_base"} <= set(fourth["cached"])
    assert not {"tune", "merge", "evaluate"} & set(fourth["cached"])


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


def test_gate_compares_answers_question_by_question(project, prefect_server):
    """Real lm-eval questions through the flow: every run keeps its per-question answers on its MLflow
    run, and the next run is judged against the champion's on the same questions; 30 questions cannot
    show a 5-point drop, so the gate says underpowered and rejects, until told to decide anyway."""
    import mlflow

    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline import tracking as mlflow_tracking

    data = EVAL_DATA
    if not (data / "ai2_arc" / "ARC-Easy").is_dir():
        pytest.skip(f"evaluation data not unpacked at {data} (run `make sources` or set QALORA_EVAL_DATA)")
    params = str(project / "params.yaml")
    evaluate = [f"data.eval_dir={data}", "evaluate.tasks=[arc_easy]", "evaluate.limit=30"]
    first = qalora_pipeline(params_file=params, overrides=evaluate, project_dir=str(project))
    assert first["passed"]
    champ = mlflow_tracking.champion("tiny-qalora")
    assert len(champ["answers"]["arc_easy"]["docs"]) == 30
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{champ['run_id']}/gate/answers.json")) == champ["answers"]

    retuned = qalora_pipeline(params_file=params, overrides=[*evaluate, "tune.seed=1"], project_dir=str(project))
    assert not retuned["passed"]
    assert "FAIL no_regression.paired: underpowered: 30 questions can only detect a drop of" in retuned["message"]
    assert "no_regression.eval.arc_easy.acc" not in retuned["message"]  # judged per question, not by tolerance
    assert "FAIL no_regression.eval.wiki_ppl" not in retuned["message"]

    anyway = qalora_pipeline(params_file=params, overrides=[*evaluate, "tune.seed=1", "gate.allow_underpowered=true"],
                             project_dir=str(project))
    assert "tune" in anyway["cached"] and "evaluate" in anyway["cached"]
    line = next(x for x in anyway["message"].splitlines() if "no_regression.paired" in x)
    assert "underpowered" in line and "(gate.allow_underpowered)" in line and "on 30 paired questions" in line


def test_promotion_exports_the_champion_when_asked(project, prefect_server):
    """export.formats: the promoted model is exported to GGUF and HQQ, each export folder is an MLflow
    artifact of the run and the report states each export's measured error."""
    import mlflow

    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline import tracking as mlflow_tracking

    from conftest import bpe_tokenizer, tiny_llama

    fp = project.parent / "fp-bpe"  # GGUF carries BPE merges: the tokenizer needs some
    tiny_llama().save_pretrained(fp)
    bpe_tokenizer().save_pretrained(fp)
    result = qalora_pipeline(params_file=str(project / "params.yaml"), project_dir=str(project),
                             overrides=[f"model.source={fp}", "export.formats=[gguf, hqq]", "export.max_new_tokens=4"])
    assert result["passed"]
    run_id = mlflow_tracking.champion("tiny-qalora")["run_id"]
    logged = {a.path for fmt in ("gguf", "hqq") for a in mlflow.MlflowClient().list_artifacts(run_id, f"exports/{fmt}")}
    assert {"exports/gguf/model.gguf", "exports/gguf/export.json", "exports/hqq/export.json"} <= logged
    gguf = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/exports/gguf/export.json"))
    assert gguf["passed"] and gguf["consumers"]["transformers"]["prompts"] == 1  # the check prompt
    report = Path(result["report"]).read_text()
    section = report[report.index("## Exports"):]
    assert "model.gguf" in section and "transformers" in section and "hqq-float32" in section
    steps = f"{gguf['weights']['max_error_steps']:.4g}"
    assert steps in section, (steps, section[:800])
