"""The promotion gate's rules: pure functions over flat figures and the champion's figures."""

import math

import pytest

from qalora.config import GateParams
from qalora.gate import decide, is_gated, metric_direction

GOOD = {"check.passed": 1.0, "check.logits.max_rel_error": 2e-7, "benchmark.decode_speedup.b1": 1.4,
        "eval.arc_easy.acc": 0.40, "eval.arc_easy.acc_norm": 0.38, "eval.arc_easy.acc_stderr": 0.03,
        "eval.wiki_ppl.perplexity": 30.0, "tune.final_loss": 1.1}


def rule(decision, name):
    matches = [r for r in decision["rules"] if r["rule"] == name]
    assert len(matches) == 1, [r["rule"] for r in decision["rules"]]
    return matches[0]


def test_all_rules_pass_without_champion():
    d = decide(GOOD, None, GateParams())
    assert d["passed"] and d["failed"] == []
    assert [r["rule"] for r in d["rules"]] == ["bit_exact", "logit_error", "decode_speedup", "no_regression"]
    assert rule(d, "no_regression")["message"] == "no champion yet"
    assert rule(d, "decode_speedup")["passed"] and "no rule" in rule(d, "decode_speedup")["message"]
    assert set(rule(d, "bit_exact")) == {"rule", "passed", "value", "threshold", "message"}


def test_bit_exact_rule():
    d = decide(GOOD | {"check.passed": 0.0}, None, GateParams())
    r = rule(d, "bit_exact")
    assert not d["passed"] and d["failed"] == ["bit_exact"]
    assert (r["value"], r["threshold"]) == (0.0, 1.0) and "failed" in r["message"]
    missing = decide({k: v for k, v in GOOD.items() if k != "check.passed"}, None, GateParams())
    assert not rule(missing, "bit_exact")["passed"] and "check.passed is missing" in rule(missing, "bit_exact")["message"]
    relaxed = decide(GOOD | {"check.passed": 0.0}, None, GateParams(require_bit_exact=False))
    assert relaxed["passed"] and "not required" in rule(relaxed, "bit_exact")["message"]


def test_logit_error_bound_is_inclusive():
    p = GateParams(max_logit_rel_error=1e-3)
    assert rule(decide(GOOD | {"check.logits.max_rel_error": 1e-3}, None, p), "logit_error")["passed"]
    d = decide(GOOD | {"check.logits.max_rel_error": 2e-3}, None, p)
    r = rule(d, "logit_error")
    assert not r["passed"] and (r["value"], r["threshold"]) == (2e-3, 1e-3) and d["failed"] == ["logit_error"]
    nan = decide(GOOD | {"check.logits.max_rel_error": math.nan}, None, p)
    assert not rule(nan, "logit_error")["passed"] and "not a finite number" in rule(nan, "logit_error")["message"]


def test_decode_speedup_rule():
    p = GateParams(min_decode_speedup=1.5)
    slow = decide(GOOD, None, p)
    assert rule(slow, "decode_speedup") | {"message": None} == {
        "rule": "decode_speedup", "passed": False, "value": 1.4, "threshold": 1.5, "message": None}
    assert decide(GOOD | {"benchmark.decode_speedup.b1": 1.5}, None, p)["passed"]
    missing = decide({k: v for k, v in GOOD.items() if not k.startswith("benchmark.")}, None, p)
    r = rule(missing, "decode_speedup")
    assert not r["passed"] and r["value"] is None and "benchmark.decode_speedup.b1 is missing" in r["message"]
    # Without the rule a disabled benchmark stage is fine.
    assert decide({k: v for k, v in GOOD.items() if not k.startswith("benchmark.")}, None, GateParams())["passed"]


def test_no_regression_against_champion_accuracy():
    champ = {"eval.arc_easy.acc": 0.45, "eval.arc_easy.acc_norm": 0.38, "eval.arc_easy.acc_stderr": 0.001}
    d = decide(GOOD, champ, GateParams(metric_tolerance=0.02))
    acc = rule(d, "no_regression.eval.arc_easy.acc")
    assert not acc["passed"] and acc["value"] == 0.40 and acc["threshold"] == pytest.approx(0.43)
    assert rule(d, "no_regression.eval.arc_easy.acc_norm")["passed"]  # equal to the champion
    assert not any("stderr" in r["rule"] for r in d["rules"])  # stderr is not a quality metric
    assert d["failed"] == ["no_regression.eval.arc_easy.acc"]
    # Within the tolerance passes.
    assert decide(GOOD, {"eval.arc_easy.acc": 0.415}, GateParams(metric_tolerance=0.02))["passed"]


def test_perplexity_is_lower_is_better():
    p = GateParams(metric_tolerance=0.1)
    better = decide(GOOD | {"eval.wiki_ppl.perplexity": 20.0}, {"eval.wiki_ppl.perplexity": 30.0}, p)
    assert better["passed"]
    within = decide(GOOD | {"eval.wiki_ppl.perplexity": 32.9}, {"eval.wiki_ppl.perplexity": 30.0}, p)
    assert within["passed"] and rule(within, "no_regression.eval.wiki_ppl.perplexity")["threshold"] == pytest.approx(33.0)
    worse = decide(GOOD | {"eval.wiki_ppl.perplexity": 33.1}, {"eval.wiki_ppl.perplexity": 30.0}, p)
    assert worse["failed"] == ["no_regression.eval.wiki_ppl.perplexity"]
    assert "lower is better" in rule(worse, "no_regression.eval.wiki_ppl.perplexity")["message"]


def test_champion_metrics_missing_from_the_run_are_reported_not_compared():
    champ = {"eval.mmlu.acc": 0.3, "eval.arc_easy.acc": 0.39}
    d = decide(GOOD, champ, GateParams())
    assert d["passed"]
    assert rule(d, "no_regression.eval.arc_easy.acc")["passed"]
    assert "eval.mmlu.acc" in rule(d, "no_regression")["message"]
    only_other = decide(GOOD, {"eval.piqa.acc": 0.6}, GateParams())
    assert only_other["passed"] and "no gated eval metric" in rule(only_other, "no_regression")["message"]


def test_floors_and_missing_floor_figures():
    p = GateParams(floors={"eval.arc_easy.acc": 0.40, "eval.mmlu.acc": 0.25, "tune.final_loss": 2.0})
    d = decide(GOOD, None, p)
    assert rule(d, "floor.eval.arc_easy.acc")["passed"]  # equal to the floor
    mmlu = rule(d, "floor.eval.mmlu.acc")
    assert not mmlu["passed"] and mmlu["value"] is None and "eval.mmlu.acc is missing" in mmlu["message"]
    loss = rule(d, "floor.tune.final_loss")
    assert not loss["passed"] and (loss["value"], loss["threshold"]) == (1.1, 2.0)
    assert d["failed"] == ["floor.eval.mmlu.acc", "floor.tune.final_loss"]


def test_max_perplexity():
    assert decide(GOOD, None, GateParams(max_perplexity=30.0))["passed"]
    d = decide(GOOD, None, GateParams(max_perplexity=25.0))
    assert d["failed"] == ["max_perplexity.eval.wiki_ppl.perplexity"]
    r = rule(d, "max_perplexity.eval.wiki_ppl.perplexity")
    assert (r["value"], r["threshold"]) == (30.0, 25.0)
    none = decide({k: v for k, v in GOOD.items() if "perplexity" not in k}, None, GateParams(max_perplexity=25.0))
    assert none["failed"] == ["max_perplexity"] and "did not run" in rule(none, "max_perplexity")["message"]


def test_empty_figures_fail_the_required_rules():
    d = decide({}, None, GateParams())
    assert d["failed"] == ["bit_exact", "logit_error"]
    assert all("missing" in rule(d, name)["message"] for name in d["failed"])


@pytest.mark.parametrize("name, direction", [
    ("eval.arc_easy.acc", "higher"), ("eval.arc_easy.acc_norm", "higher"), ("eval.mmlu.acc", "higher"),
    ("eval.wiki_ppl.perplexity", "lower"), ("eval.wikitext.word_perplexity", "lower"), ("eval.x.bits_per_byte", "lower"),
    ("eval.gsm8k.exact_match_strict-match", "higher"), ("eval.wiki_ppl.nll", None), ("eval.mmlu.n", None),
    ("eval.arc_easy.acc_stderr", None), ("eval.mmlu.seconds", None), ("eval.timing.wall_s_per_1000_questions", None), ("tune.final_loss", None),
    ("check.logits.max_rel_error", None),
])
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction


# What the evaluate stage reports (figure names as the pipeline builds them): MMLU overall, its four
# subject groups, 2-question subjects, the seven commonsense tasks and wiki perplexity.
GROUPS = ("mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")
SUBJECTS = ("mmlu_anatomy", "mmlu_astronomy", "mmlu_virology", "mmlu_world_religions")
COMMONSENSE = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")


def eval_figures(acc: float = 0.4, subject_acc: float = 0.5, ppl: float = 30.0) -> dict[str, float]:
    figs = {"check.passed": 1.0, "check.logits.max_rel_error": 2e-7, "eval.mmlu.acc": acc, "eval.mmlu.n": 114.0,
            "eval.wiki_ppl.perplexity": ppl, "eval.wiki_ppl.nll": 3.4, "eval.timing.wall_s_per_1000_questions": 9.0}
    figs |= {f"eval.{g}.acc": acc for g in GROUPS} | {f"eval.{g}.acc_stderr": 0.05 for g in GROUPS}
    figs |= {f"eval.{t}.acc": subject_acc for t in SUBJECTS} | {f"eval.{t}.n": 2.0 for t in SUBJECTS}
    figs |= {f"eval.{t}.acc": acc for t in COMMONSENSE} | {f"eval.{t}.acc_norm": acc for t in COMMONSENSE if t != "boolq"}
    return figs


def test_no_regression_compares_the_aggregates_not_two_question_subjects():
    champ = eval_figures(subject_acc=1.0)
    d = decide(eval_figures(subject_acc=0.0), champ, GateParams())  # every subject lost both its questions
    assert d["passed"], d["failed"]
    compared = {r["rule"] for r in d["rules"] if r["rule"].startswith("no_regression.")}
    assert compared == ({"no_regression.eval.mmlu.acc", "no_regression.eval.wiki_ppl.perplexity"}
                        | {f"no_regression.eval.{g}.acc" for g in GROUPS}
                        | {f"no_regression.eval.{t}.acc" for t in COMMONSENSE}
                        | {f"no_regression.eval.{t}.acc_norm" for t in COMMONSENSE if t != "boolq"})
    assert len(d["rules"]) == 3 + len(compared)
    # A drop on an aggregate fails its rule.
    worse = eval_figures() | {"eval.mmlu_stem.acc": 0.3, "eval.piqa.acc_norm": 0.3, "eval.wiki_ppl.perplexity": 40.0}
    d = decide(worse, champ, GateParams())
    assert d["failed"] == ["no_regression.eval.mmlu_stem.acc", "no_regression.eval.piqa.acc_norm",
                           "no_regression.eval.wiki_ppl.perplexity"]


def test_regression_tasks_are_the_teams_choice():
    champ = eval_figures(subject_acc=1.0)
    only_mmlu = decide(eval_figures(subject_acc=0.0), champ, GateParams(regression_tasks=["mmlu"]))
    assert [r["rule"] for r in only_mmlu["rules"]][3:] == ["no_regression.eval.mmlu.acc"]
    every_subject = decide(eval_figures(subject_acc=0.0), champ, GateParams(regression_tasks=["mmlu_*"]))
    assert every_subject["failed"] == [f"no_regression.eval.{t}.acc" for t in SUBJECTS]


@pytest.mark.parametrize("name, gated", [
    ("eval.mmlu.acc", True), ("eval.mmlu_stem.acc", True), ("eval.hellaswag.acc_norm", True),
    ("eval.wiki_ppl.perplexity", True), ("eval.mmlu_anatomy.acc", False), ("eval.mmlu.n", False),
    ("eval.mmlu_stem.acc_stderr", False), ("eval.wiki_ppl.nll", False), ("eval.timing.wall_s_per_1000_questions", False),
    ("check.logits.max_rel_error", False), ("eval.acc", False),
])
def test_is_gated_by_default(name, gated):
    assert is_gated(name, GateParams().regression_tasks) is gated
