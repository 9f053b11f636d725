"""Run report: markdown/HTML with the gate table, every figure, PNG plots; written atomically."""

import json

import pytest

from qalora import report
from qalora.config import GateParams
from qalora.gate import decide

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_summary():
    figures = {"quantize.seconds": 12.5, "tune.final_loss": 1.25, "merge.max_abs_zero_shift": 0.031,
               "check.passed": 1.0, "check.logits.max_rel_error": 3.2e-7, "check.logits.greedy_identical_prompts": 4.0,
               "benchmark.decode_tok_s.lowbit.b1": 31.0, "benchmark.decode_tok_s.fp.b1": 24.0,
               "benchmark.decode_speedup.b1": 31.0 / 24.0, "eval.arc_easy.acc": 0.41, "eval.arc_easy.acc_norm": 0.39,
               "eval.mmlu.acc": 0.26, "eval.wiki.perplexity": 27.3}
    return {
        "run_name": "default-20260101-000000",
        "figures": figures,
        "loss_curve": [{"step": i, "loss": 3.0 - 0.04 * i} for i in range(1, 41)],
        "latency": [{"batch": 1, "lowbit_tok_s": 31.0, "fp_tok_s": 24.0, "lowbit_ms_per_token": 32.3, "fp_ms_per_token": 41.7},
                    {"batch": 4, "lowbit_tok_s": 95.0, "fp_tok_s": 88.0, "lowbit_ms_per_token": 10.5, "fp_ms_per_token": 11.4}],
        "accuracy": {"arc_easy": {"acc": 0.41, "acc_stderr": 0.02, "acc_norm": 0.39, "acc_norm_stderr": 0.02},
                     "mmlu": {"acc": 0.26, "acc_stderr": 0.01}},
        "check": {"passed": True, "failed": [], "checks": {
            "codes": {"passed": True, "layers": 210, "layers_with_changed_codes": 0},
            "logits": {"passed": True, "max_rel_error": 3.2e-7, "rel_tol": 1e-3, "greedy_identical_prompts": 4, "prompts": 4},
            "deploy": {"passed": True, "max_error_over_bound": 0.004, "dtype": "float32"}}},
        "lineage": {"git_sha": "0123abcd", "git_dirty": False, "data_md5": "d41d8cd98f00b204e9800998ecf8427e",
                    "params_hash": "ph", "code_version": "cv1", "seed": 0, "versions": {"torch": "2.13.0"}},
        "paths": {"quantized": "/s/quantized", "adapter": "/s/adapter", "merged": "/s/merged", "check_json": "/s/check.json"},
    }


def test_full_report(tmp_path):
    summary = full_summary()
    decision = decide(summary["figures"], {"eval.arc_easy.acc": 0.5}, GateParams(min_decode_speedup=1.5))
    assert decision["failed"] == ["decode_speedup", "no_regression.eval.arc_easy.acc"]
    md_path = report.write_report(tmp_path / "report", summary, decision)
    folder = tmp_path / "report"
    assert md_path == folder / "report.md"
    names = {p.name for p in folder.iterdir()}
    assert names == {"report.md", "report.html", "summary.json", "decision.json",
                     "loss.png", "latency.png", "accuracy.png", "merge_error.png"}
    for png in ("loss.png", "latency.png", "accuracy.png", "merge_error.png"):
        assert (folder / png).read_bytes()[:8] == PNG_MAGIC and (folder / png).stat().st_size > 5000
    md = md_path.read_text()
    assert "**Gate: FAILED** — rejected" in md and "Failed rules: decode_speedup, no_regression.eval.arc_easy.acc" in md
    assert "| rule | result | value | threshold | message |" in md
    assert "| decode_speedup | FAIL | 1.292 | 1.5 |" in md
    assert "| no_regression.eval.arc_easy.acc | FAIL | 0.41 | 0.48 |" in md
    assert "| bit_exact | pass | 1 | 1 |" in md
    for name in summary["figures"]:
        assert f"| {name} | " in md
    for png in ("loss.png", "latency.png", "accuracy.png", "merge_error.png"):
        assert f"]({png})" in md
    assert "| git_sha | 0123abcd |" in md and "| versions.torch | 2.13.0 |" in md
    assert "| merged | /s/merged |" in md and "| check_json | /s/check.json |" in md
    assert "| logits | pass | " in md and "max_rel_error=3.2e-07" in md
    html = (folder / "report.html").read_text()
    assert '<img src="loss.png"' in html and '<td class="fail">FAIL</td>' in html and "<strong>Gate: FAILED</strong>" in html
    # The inputs are kept so the folder re-renders on its own.
    assert json.loads((folder / "summary.json").read_text())["figures"] == summary["figures"]
    assert json.loads((folder / "decision.json").read_text())["failed"] == decision["failed"]


def test_passed_decision_and_rerender_in_place(tmp_path):
    summary = full_summary()
    decision = decide(summary["figures"], None, GateParams())
    folder = tmp_path / "r"
    report.write_report(folder, summary, decision)
    # Re-render from the folder's own inputs, replacing it (what `qalora report --run` does).
    again = report.write_report(folder, json.loads((folder / "summary.json").read_text()),
                                json.loads((folder / "decision.json").read_text()))
    md = again.read_text()
    assert "**Gate: PASSED** — promoted" in md and "| no_regression | pass | — | — | no champion yet |" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_empty_summary_skips_plots(tmp_path):
    md = report.write_report(tmp_path / "r", {}, {}).read_text()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["decision.json", "report.html", "report.md", "summary.json"]
    assert "Not plotted (no data in this run): loss, latency, accuracy, baselines, merge_error." in md
    assert "No figures were recorded." in md and "No gate rules were evaluated." in md


def test_partial_summary_plots_what_it_has(tmp_path):
    summary = {"run_name": "bench-only", "latency": [{"batch": 1, "lowbit_tok_s": 10.0, "fp_tok_s": 8.0}],
               "accuracy": {"wiki": {"perplexity": 30.0}},  # no accuracy metric: no bar chart
               "figures": {"check.logits.max_rel_error": 1e-6}}  # no tolerance known: no error plot
    report.write_report(tmp_path / "r", summary, {"passed": False, "failed": ["bit_exact"], "rules": []})
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["latency.png"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Not plotted (no data in this run): loss, accuracy, baselines, merge_error." in md
    assert "| wiki | 30 |" in md


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not part of a report"):
        report.write_report(run_dir, full_summary(), {})
    assert (run_dir / "model.safetensors").read_bytes() == b"precious"


def test_crash_leaves_previous_report_intact(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    report.write_report(folder, {"run_name": "first"}, {})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_latency", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(folder, full_summary(), {})
    assert "qalora run report: first" in (folder / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_baselines_side_by_side_and_no_per_subject_dump(tmp_path):
    """fp, untuned quantized and merged figures -> the deltas' table and plot; MMLU subjects stay out."""
    from qalora.figures import baseline_deltas

    figures = {"eval_fp.arc_easy.acc": 0.50, "eval_base.arc_easy.acc": 0.44, "eval.arc_easy.acc": 0.47,
               "eval.arc_easy.acc_stderr": 0.02, "eval_fp.wiki_ppl.perplexity": 22.0,
               "eval_base.wiki_ppl.perplexity": 27.0, "eval.wiki_ppl.perplexity": 25.5,
               "eval.mmlu_anatomy.acc": 0.5, "eval_fp.mmlu_anatomy.acc": 0.25, "eval_base.mmlu_anatomy.acc": 0.3,
               "eval.mmlu_stem.acc": 0.3, "eval.arc_easy.acc_norm": 0.4}  # acc_norm: merged only, no delta
    figures |= baseline_deltas(figures)
    assert figures["delta.quantization.arc_easy.acc"] == pytest.approx(-0.06)
    assert figures["delta.tuning.arc_easy.acc"] == pytest.approx(0.03)
    assert figures["delta.quantization.wiki_ppl.perplexity"] == pytest.approx(5.0)
    assert figures["delta.tuning.wiki_ppl.perplexity"] == pytest.approx(-1.5)
    assert not any("mmlu_anatomy" in k or "acc_norm" in k for k in figures if k.startswith("delta."))
    md = report.write_report(tmp_path / "r", {"figures": figures}, {}).read_text()
    assert "## What quantization cost and tuning bought" in md
    assert "| arc_easy | acc | 0.5 | 0.44 | 0.47 | -0.06 | 0.03 | 0.02 |" in md
    assert "| wiki_ppl | perplexity | 22 | 27 | 25.5 | 5 | -1.5 | — |" in md
    assert (tmp_path / "r" / "baselines.png").read_bytes()[:8] == PNG_MAGIC
    assert "mmlu_anatomy" not in md and "| eval.mmlu_stem.acc | 0.3 |" in md
    assert "3 per-subject MMLU figures are in eval.json" in md


def _sweep_record(method, bits, group, correct, ppl):
    """A sweep variant with ``correct`` (list of 0/1) as its arc_easy answers."""
    docs = {str(i): [c, f"h{i}"] for i, c in enumerate(correct)}
    acc = sum(correct) / len(correct)
    metrics = {"arc_easy/acc": acc, "arc_easy/acc_stderr": (acc * (1 - acc) / len(correct)) ** 0.5,
               "wiki_ppl/perplexity": ppl}
    return {"method": method, "bits": bits, "group_size": group, "metrics": metrics,
            "params": {"setting.tuning": "40 steps"}, "answers": {"arc_easy": {"groups": [], "metric": "acc", "docs": docs}}}


def test_sweep_report_marks_only_the_significant_differences(tmp_path):
    from qalora.report.accuracy import commonsense_average, write_accuracy_report

    qalora = [1] * 80 + [0] * 20
    records = [
        _sweep_record("fp", None, None, [1] * 85 + [0] * 15, 20.0),
        _sweep_record("qalora", 2, 64, qalora, 30.0),
        _sweep_record("gptq", 2, 64, [1] * 40 + [0] * 60, 2500.0),        # 40 questions worse: significant
        _sweep_record("qlora_gptq", 2, 64, [1] * 78 + [0] * 22, 40.0),    # 2 worse: noise
    ]
    path = write_accuracy_report(tmp_path / "accuracy.md", records)
    text = path.read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    vs_gptq = next(line for line in text.splitlines() if "QA-LoRA − GPTQ alone" in line)
    vs_qlora = next(line for line in text.splitlines() if "QA-LoRA − QLoRA (NF4) → GPTQ" in line)
    assert "+0.400*" in vs_gptq and "(n=100)" in vs_gptq
    assert "+0.020 " in vs_qlora and "*" not in vs_qlora.split("|")[3]
    assert "| QA-LoRA | int2.g64 |" in text and "tuning: 40 steps" in text
    # the seven-task average needs all seven tasks
    assert commonsense_average(records[1]["metrics"]) == (None, None)
    seven = {f"{t}/acc": 0.5 for t in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq",
                                        "openbookqa")} | {f"{t}/acc_stderr": 0.07 for t in (
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")}
    avg, se = commonsense_average(seven)
    assert avg == 0.5 and abs(se - 0.07 / 7 ** 0.5) < 1e-12
