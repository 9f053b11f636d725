"""The promotion gate's rules: pure functions over flat figures and the champion's figures."""

import math

import pytest

from qalora.config import GateParams
from qalora.gate import decide, metric_direction

GOOD = {"check.passed": 1.0, "check.logits.max_rel_error": 2e-7, "benchmark.decode_speedup.b1": 1.4,
        "eval.arc_easy.acc": 0.40, "eval.arc_easy.acc_norm": 0.38, "eval.arc_easy.acc_stderr": 0.03,
        "eval.wiki.perplexity": 30.0, "tune.final_loss": 1.1}


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
    better = decide(GOOD | {"eval.wiki.perplexity": 20.0}, {"eval.wiki.perplexity": 30.0}, p)
    assert better["passed"]
    within = decide(GOOD | {"eval.wiki.perplexity": 32.9}, {"eval.wiki.perplexity": 30.0}, p)
    assert within["passed"] and rule(within, "no_regression.eval.wiki.perplexity")["threshold"] == pytest.approx(33.0)
    worse = decide(GOOD | {"eval.wiki.perplexity": 33.1}, {"eval.wiki.perplexity": 30.0}, p)
    assert worse["failed"] == ["no_regression.eval.wiki.perplexity"]
    assert "lower is better" in rule(worse, "no_regression.eval.wiki.perplexity")["message"]


def test_champion_metrics_missing_from_the_run_are_reported_not_compared():
    champ = {"eval.mmlu.acc": 0.3, "eval.arc_easy.acc": 0.39}
    d = decide(GOOD, champ, GateParams())
    assert d["passed"]
    assert rule(d, "no_regression.eval.arc_easy.acc")["passed"]
    assert "eval.mmlu.acc" in rule(d, "no_regression")["message"]
    only_other = decide(GOOD, {"eval.piqa.acc": 0.6}, GateParams())
    assert only_other["passed"] and "no eval metric in common" in rule(only_other, "no_regression")["message"]


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
    assert d["failed"] == ["max_perplexity.eval.wiki.perplexity"]
    r = rule(d, "max_perplexity.eval.wiki.perplexity")
    assert (r["value"], r["threshold"]) == (30.0, 25.0)
    none = decide({k: v for k, v in GOOD.items() if "perplexity" not in k}, None, GateParams(max_perplexity=25.0))
    assert none["failed"] == ["max_perplexity"] and "did not run" in rule(none, "max_perplexity")["message"]


def test_empty_figures_fail_the_required_rules():
    d = decide({}, None, GateParams())
    assert d["failed"] == ["bit_exact", "logit_error"]
    assert all("missing" in rule(d, name)["message"] for name in d["failed"])


@pytest.mark.parametrize("name, direction", [
    ("eval.arc_easy.acc", "higher"), ("eval.arc_easy.acc_norm", "higher"), ("eval.mmlu.acc", "higher"),
    ("eval.wiki.perplexity", "lower"), ("eval.wikitext.word_perplexity", "lower"), ("eval.x.bits_per_byte", "lower"),
    ("eval.gsm8k.exact_match_strict-match", "higher"), ("eval.wiki_ppl.nll", None), ("eval.mmlu.n", None),
    ("eval.arc_easy.acc_stderr", None), ("eval.mmlu.seconds", None), ("eval.timing.wall_s_per_1000_questions", None), ("tune.final_loss", None),
    ("check.logits.max_rel_error", None),
])
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction
