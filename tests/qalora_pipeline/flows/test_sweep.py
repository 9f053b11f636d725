"""The accuracy sweep on the tiny project with real lm-eval questions, real Prefect and MLflow: every
variant evaluated and logged once, the report rebuilt from MLflow alone, and a re-run reusing everything."""

import re

import pytest

from conftest import EVAL_DATA

SWEEP = ["quantize.method=rtn", "sweep.bits=[4, 2]", "sweep.group_sizes=[32]", "tune.steps=3",
         "evaluate.tasks=[arc_easy]", "evaluate.limit=12", f"data.eval_dir={EVAL_DATA}"]


def test_sweep_runs_every_variant_once_and_reports_from_mlflow(project, prefect_server, state_dir):
    from mlflow.tracking import MlflowClient

    from qalora_pipeline import tracking
    from qalora.config import load_params
    from qalora_pipeline.flows.sweep import qalora_sweep

    if not (EVAL_DATA / "ai2_arc" / "ARC-Easy").is_dir():
        pytest.skip(f"evaluation data not unpacked at {EVAL_DATA} (run `make sources` or set QALORA_EVAL_DATA)")
    params = str(project / "params.yaml")
    overrides = [*SWEEP, f"sweep.report={project / 'reports' / 'accuracy.md'}"]
    first = qalora_sweep(params_file=params, overrides=overrides, project_dir=str(project))
    # fp, LoRA on fp, and {QA-LoRA, QLoRA->GPTQ, GPTQ} at int4.g32 and int2.g32
    assert first["variants"] == 8 and first["newly_logged"] == 8

    uri = tracking.configure(load_params(params, overrides).tracking)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qalora-sweep")
    runs = client.search_runs([exp.experiment_id], "tags.`qalora.sweep` = 'tiny'")
    assert sorted((r.data.tags["method"], r.data.tags["bits"]) for r in runs) == sorted(
        [("fp", "None"), ("lora_fp", "None")] + [(m, b) for m in ("qalora", "qlora_gptq", "gptq") for b in ("4", "2")])
    assert all(r.data.metrics["arc_easy/n"] == 12 for r in runs)
    tuned = {r.data.tags["method"]: r.data.metrics.get("trainable_params", 0) for r in runs if r.data.tags["bits"] == "4"}
    assert 0 < tuned["qalora"] < tuned["qlora_gptq"]  # QA-LoRA's A has D_in / 32 columns, LoRA's D_in
    assert tuned["gptq"] == 0

    # GPTQ alone and QA-LoRA share their base; QLoRA -> GPTQ quantizes the merged fp model: 4 quantize folders.
    assert len(list((state_dir / "stages" / "quantize").glob("int*"))) == 4
    assert len(list((state_dir / "stages" / "lora-tune").glob("*"))) == 2  # fp and nf4 bases, once each

    report = (project / "reports" / "accuracy.md").read_text()
    assert (project / "reports" / "accuracy.png").stat().st_size > 10_000
    for label in ("| QA-LoRA | int4.g32 |", "| QA-LoRA | int2.g32 |", "| QLoRA (NF4) → GPTQ | int2.g32 |",
                  "| GPTQ alone | int4.g32 |", "| LoRA on fp (no quantization) | – |", "| fp model (no tuning) | – |"):
        assert label in report, label
    assert len(re.findall(r"\| int[42]\.g32 \| QA-LoRA − ", report)) == 6  # vs GPTQ, QLoRA->GPTQ, LoRA fp, each setting
    assert "(n=12)" in report and "tuning: 3 steps" in report

    again = qalora_sweep(params_file=params, overrides=overrides, project_dir=str(project))
    assert again["newly_logged"] == 0  # every stage cached: the same evaluations, no second run of any variant
    assert len(client.search_runs([exp.experiment_id], "tags.`qalora.sweep` = 'tiny'")) == 8
