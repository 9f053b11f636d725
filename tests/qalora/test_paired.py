"""The paired comparison behind the no-regression gate, and the gate rule built on it."""

import math
import random

import pytest

from qalora.config import GateParams
from qalora.gate import decide
from qalora.paired import compare, gated_correctness

GOOD = {"check.passed": 1.0, "check.logits.max_rel_error": 2e-7, "eval.arc_easy.acc": 0.40,
        "eval.wiki_ppl.perplexity": 30.0}


def answers(correct: list[int], task: str = "arc_easy", groups: tuple[str, ...] = ()) -> dict:
    return {task: {"groups": list(groups), "metric": "acc",
                   "docs": {str(i): [c, f"h{i:015d}"] for i, c in enumerate(correct)}}}


def paired_rule(d):
    return next(r for r in d["rules"] if r["rule"] == "no_regression.paired")


def test_exact_mcnemar_and_interval_by_hand():
    # 100 questions: the models agree on 80, champion-only right on 15, challenger-only on 5.
    champ = [1] * 15 + [0] * 5 + [1] * 40 + [0] * 40
    chal = [0] * 15 + [1] * 5 + [1] * 40 + [0] * 40
    c = compare(dict(enumerate(champ)), dict(enumerate(chal)), confidence=0.95)
    assert (c.n, c.only_champion, c.only_challenger) == (100, 15, 5)
    assert c.delta == pytest.approx(-0.10) and (c.champion_acc, c.challenger_acc) == (0.55, 0.45)
    # P(X >= 15), X ~ Bin(20, 1/2) = 21700 / 2^20
    assert c.p_worse == pytest.approx(21700 / 2 ** 20)
    se = math.sqrt((0.20 - 0.01) / 100)
    assert (c.ci_low, c.ci_high) == pytest.approx((-0.10 - 1.959964 * se, -0.10 + 1.959964 * se), abs=1e-5)
    assert c.mdd == pytest.approx((1.644854 + 0.841621) * math.sqrt(0.20 / 100), abs=1e-5)


def test_identical_answers_are_not_worse_and_only_shared_questions_count():
    champ = {"a": 1, "b": 0, "c": 1}
    c = compare(champ, {"a": 1, "b": 0, "x": 0})
    assert c.n == 2 and c.delta == 0 and c.p_worse == 1.0
    with pytest.raises(ValueError, match="no question answered by both"):
        compare({"a": 1}, {"b": 1})


def test_power_simulation_matches_the_stated_detectable_drop():
    """At a true drop equal to the stated MDD, the one-sided test rejects in about 80% of simulated evals."""
    rng = random.Random(0)
    n, disc = 600, 0.3
    mdd = compare({i: int(i < disc * n / 2) for i in range(n)},
                  {i: int(disc * n / 2 <= i < disc * n) for i in range(n)}).mdd
    p_b = (disc + mdd) / 2  # discordant pairs split so that E[(c - b) / n] = -mdd
    rejected = 0
    for _ in range(400):
        champ, chal = {}, {}
        for i in range(n):
            u = rng.random()
            champ[i], chal[i] = (1, 0) if u < p_b else (0, 1) if u < disc else (1, 1)
        rejected += compare(champ, chal).p_worse < 0.05
    assert 0.70 <= rejected / 400 <= 0.90, rejected / 400


def test_gated_correctness_matches_tasks_and_their_groups():
    rec = answers([1, 0], "mmlu_anatomy", ("mmlu_stem", "mmlu")) | answers([1], "boolq") | answers([0], "other")
    keys = gated_correctness(rec, ["mmlu", "boolq"])
    assert sorted(k.split(":")[0] for k in keys) == ["boolq", "mmlu_anatomy", "mmlu_anatomy"]
    assert gated_correctness(None, ["mmlu"]) == {}


def test_gate_rejects_a_significant_drop_and_reports_the_interval():
    rng = random.Random(1)
    champ = [int(rng.random() < 0.6) for _ in range(800)]
    worse = [c if rng.random() > 0.25 else 0 for c in champ]  # loses about 15% of its right answers
    d = decide(GOOD, GOOD, GateParams(), answers(worse), answers(champ))
    r = paired_rule(d)
    assert not d["passed"] and r["message"].startswith("significantly worse")
    assert r["paired"]["ci_high"] < 0 and r["paired"]["p_worse"] < 0.05 and r["paired"]["n"] == 800
    # Accuracy figures are judged by the paired rule only; perplexity still by its tolerance.
    assert not any(x["rule"] == "no_regression.eval.arc_easy.acc" for x in d["rules"])
    assert any(x["rule"] == "no_regression.eval.wiki_ppl.perplexity" for x in d["rules"])


def test_gate_passes_an_equal_model_on_enough_questions():
    rng = random.Random(2)
    champ = [int(rng.random() < 0.6) for _ in range(800)]
    right = [i for i, c in enumerate(champ) if c]
    wrong = [i for i, c in enumerate(champ) if not c]
    flips = set(rng.sample(right, 50)) | set(rng.sample(wrong, 50))  # as many lost as gained: no real change
    noisy = [1 - c if i in flips else c for i, c in enumerate(champ)]
    d = decide(GOOD, GOOD, GateParams(), answers(noisy), answers(champ))
    r = paired_rule(d)
    assert d["passed"] and r["message"].startswith("not significantly worse"), r["message"]
    assert r["paired"]["delta"] == 0 and r["paired"]["mdd"] <= 0.05 and r["paired"]["ci_low"] < 0 < r["paired"]["ci_high"]


def test_too_few_questions_say_underpowered_instead_of_passing():
    champ = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 2
    chal = [0, 1, 1, 0, 0, 1, 1, 0, 1, 1] * 2
    d = decide(GOOD, GOOD, GateParams(), answers(chal), answers(champ))
    r = paired_rule(d)
    assert not d["passed"] and r["message"].startswith("underpowered: 20 questions")
    assert "gate.allow_underpowered" in r["message"] and r["paired"]["mdd"] > 0.05
    allowed = decide(GOOD, GOOD, GateParams(allow_underpowered=True), answers(chal), answers(champ))
    assert allowed["passed"] and "underpowered" in paired_rule(allowed)["message"]


def test_changed_questions_are_not_paired_and_an_old_champion_falls_back_to_tolerance():
    champ = answers([1] * 50)
    changed = {"arc_easy": {**champ["arc_easy"], "docs": {k: [1, "other"] for k in champ["arc_easy"]["docs"]}}}
    d = decide(GOOD, GOOD, GateParams(), changed, champ)
    assert not d["passed"] and "no question in common" in paired_rule(d)["message"]
    old = decide(GOOD, GOOD | {"eval.arc_easy.acc": 0.41}, GateParams(), answers([1] * 50), None)
    acc = next(r for r in old["rules"] if r["rule"] == "no_regression.eval.arc_easy.acc")
    assert acc["passed"] and "unpaired" in acc["message"]
