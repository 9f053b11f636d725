"""The promotion gate: pure rules over a run's flat figures and the current champion's figures.

Each rule yields ``{"rule", "passed", "value", "threshold", "message"}``; a missing figure fails
its rule with a message naming the figure (a stage that did not run proves nothing). Rules:

``bit_exact``                    ``check.passed == 1`` (when ``gate.require_bit_exact``)
``logit_error``                  ``check.logits.max_rel_error <= gate.max_logit_rel_error``
``decode_speedup``               ``benchmark.decode_speedup.b1 >= gate.min_decode_speedup`` (when set)
``no_regression.paired``         accuracy on the questions of ``gate.regression_tasks`` that both the run
                                 and the champion answered (per-question records, :mod:`qalora.paired`):
                                 fails when the challenger is significantly worse (exact one-sided
                                 McNemar, ``gate.confidence``), or when the questions are too few to
                                 detect a drop of ``gate.max_accuracy_drop`` at 80% power (unless
                                 ``gate.allow_underpowered``); reports the difference with its interval.
``no_regression.<metric>``       lower-is-better metrics (perplexity, ...) of the gated tasks present in
                                 both: <= champion * (1 + metric_tolerance). Without per-question records
                                 on both sides (a champion from before they existed) accuracies fall back
                                 to >= champion - metric_tolerance, and the rule says it is unpaired.
                                 A single passing ``no_regression`` rule when there is no champion.
``floor.<metric>``               ``figure >= gate.floors[metric]``
``max_perplexity.<metric>``      every ``eval.*perplexity*`` figure <= ``gate.max_perplexity`` (when set)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

from qalora.config import GateParams
from qalora.figures import BIT_EXACT, DECODE_SPEEDUP, LOGIT_ERROR
from qalora.paired import compare, gated_correctness

_HIGHER = {"acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "mcc", "mc1", "mc2", "bleu", "rouge1",
           "rouge2", "rougeL", "rougel"}
_LOWER = {"perplexity", "ppl", "word_perplexity", "byte_perplexity", "token_perplexity", "bits_per_byte"}


def metric_direction(name: str) -> str | None:
    """``"higher"`` / ``"lower"`` is better for an ``eval.*`` figure; None if it is not a quality metric.

    The last dotted component decides (lm-eval's ``acc,none`` filter suffix is ignored), so
    ``eval.arc_easy.acc`` is higher-is-better, ``eval.wiki_ppl.perplexity`` lower-is-better, and
    ``eval.arc_easy.acc_stderr``, ``eval.wiki_ppl.nll`` (perplexity says it) or ``eval.mmlu.n`` are not compared.
    """
    if not name.startswith("eval."):
        return None
    leaf = name.rsplit(".", 1)[-1].split(",", 1)[0]
    if leaf.endswith("_stderr"):
        return None
    if leaf in _LOWER or leaf.endswith("perplexity"):
        return "lower"
    if leaf in _HIGHER or leaf.startswith("exact_match_"):  # lm-eval filters: exact_match_strict-match
        return "higher"
    return None


def metric_task(name: str) -> str | None:
    """The task or group an ``eval.<task>.<metric>`` figure belongs to (``eval.mmlu_stem.acc`` -> ``mmlu_stem``)."""
    if not name.startswith("eval.") or name.count(".") < 2:
        return None
    return name[len("eval."):].rsplit(".", 1)[0]


def is_gated(name: str, tasks: Iterable[str]) -> bool:
    """Whether the no-regression rule compares figure ``name``: a quality metric of a task or group
    matching one of ``tasks`` (``gate.regression_tasks``, fnmatch patterns such as ``mmlu_*``)."""
    task = metric_task(name)
    return (task is not None and metric_direction(name) is not None
            and any(fnmatch.fnmatchcase(task, pattern) for pattern in tasks))


def _number(figures: Mapping[str, Any] | None, key: str) -> float | None:
    """The figure as a finite-or-not float, or None when missing / not a number."""
    if not figures or key not in figures:
        return None
    value = figures[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _rule(rule: str, passed: bool, value: Any, threshold: Any, message: str) -> dict[str, Any]:
    return {"rule": rule, "passed": bool(passed), "value": value, "threshold": threshold, "message": message}


def _missing(rule: str, key: str, threshold: Any, why: str) -> dict[str, Any]:
    return _rule(rule, False, None, threshold, f"figure {key} is missing: {why}")


def _not_finite(rule: str, key: str, value: float, threshold: Any) -> dict[str, Any]:
    return _rule(rule, False, value, threshold, f"{key} = {value} is not a finite number")


def _bit_exact(figures: Mapping[str, Any], p: GateParams) -> dict[str, Any]:
    if not p.require_bit_exact:
        return _rule("bit_exact", True, _number(figures, BIT_EXACT), None, "not required (gate.require_bit_exact = false)")
    v = _number(figures, BIT_EXACT)
    if v is None:
        return _missing("bit_exact", BIT_EXACT, 1.0, "the bit-exactness check did not run")
    ok = v == 1.0
    return _rule("bit_exact", ok, v, 1.0,
                 "merged model is bit-exact (codes, scales, logits, deploy, roundtrip)" if ok
                 else f"{BIT_EXACT} = {v:g}: the bit-exactness check failed")


def _logit_error(figures: Mapping[str, Any], p: GateParams) -> dict[str, Any]:
    bound = p.max_logit_rel_error
    v = _number(figures, LOGIT_ERROR)
    if v is None:
        return _missing("logit_error", LOGIT_ERROR, bound, "the check stage's logits comparison did not run")
    if not math.isfinite(v):
        return _not_finite("logit_error", LOGIT_ERROR, v, bound)
    ok = v <= bound
    return _rule("logit_error", ok, v, bound,
                 f"{LOGIT_ERROR} = {v:.3g} {'<=' if ok else '>'} gate.max_logit_rel_error = {bound:g}")


def _decode_speedup(figures: Mapping[str, Any], p: GateParams) -> dict[str, Any]:
    need = p.min_decode_speedup
    v = _number(figures, DECODE_SPEEDUP)
    if need is None:
        return _rule("decode_speedup", True, v, None, "no rule (gate.min_decode_speedup is null)")
    if v is None:
        return _missing("decode_speedup", DECODE_SPEEDUP, need,
                        "the benchmark stage did not run or measured no batch-1 decode against fp")
    if not math.isfinite(v):
        return _not_finite("decode_speedup", DECODE_SPEEDUP, v, need)
    ok = v >= need
    return _rule("decode_speedup", ok, v, need,
                 f"low-bit decode is {v:.3g}x fp at batch 1 ({'>=' if ok else '<'} gate.min_decode_speedup = {need:g})")


def _paired(answers: Mapping[str, Any] | None, champion_answers: Mapping[str, Any] | None,
            p: GateParams) -> dict[str, Any] | None:
    """The ``no_regression.paired`` rule, or None when either side has no gated per-question record."""
    ours = gated_correctness(answers, p.regression_tasks)
    theirs = gated_correctness(champion_answers, p.regression_tasks)
    if not ours or not theirs:
        return None
    if not set(ours) & set(theirs):
        return _rule("no_regression.paired", False, None, p.max_accuracy_drop,
                     f"no question in common with the champion ({len(ours)} here, {len(theirs)} there: other tasks, "
                     "limits or data); evaluate the same questions to compare")
    cmp = compare(theirs, ours, p.confidence)
    level = f"{cmp.confidence:.0%}"
    effect = (f"challenger - champion = {cmp.delta:+.3f} [{cmp.ci_low:+.3f}, {cmp.ci_high:+.3f}] ({level} interval) on "
              f"{cmp.n} paired questions ({cmp.champion_acc:.3f} -> {cmp.challenger_acc:.3f}; champion-only right "
              f"{cmp.only_champion}, challenger-only {cmp.only_challenger}; one-sided McNemar p = {cmp.p_worse:.3g}; "
              f"detectable drop {cmp.mdd:.3f} at 80% power)")
    if cmp.p_worse < 1 - cmp.confidence:
        passed, msg = False, f"significantly worse: {effect}"
    elif cmp.mdd > p.max_accuracy_drop:
        passed = p.allow_underpowered
        msg = (f"underpowered: {cmp.n} questions can only detect a drop of {cmp.mdd:.3f}, more than "
               f"gate.max_accuracy_drop = {p.max_accuracy_drop:g}; {effect}"
               + (" (gate.allow_underpowered)" if passed else
                  ". Evaluate more questions (evaluate.limit) or set gate.allow_underpowered"))
    else:
        passed, msg = True, f"not significantly worse: {effect}"
    # value: the accuracy difference; the whole comparison rides along for reports and audits
    return _rule("no_regression.paired", passed, cmp.delta, p.max_accuracy_drop, msg) | {"paired": cmp.as_dict()}


def _no_regression(figures: Mapping[str, Any], champion: Mapping[str, Any] | None, p: GateParams,
                   answers: Mapping[str, Any] | None = None,
                   champion_answers: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    if champion is None:
        return [_rule("no_regression", True, None, None, "no champion yet")]
    paired = _paired(answers, champion_answers, p)
    tol = p.metric_tolerance
    ours = {k for k in figures if is_gated(k, p.regression_tasks) and _number(figures, k) is not None}
    theirs = {k for k in champion if is_gated(k, p.regression_tasks) and _number(champion, k) is not None}
    if paired is not None:  # accuracies are judged on the paired questions; perplexities stay per figure
        ours = {k for k in ours if metric_direction(k) == "lower"}
        theirs = {k for k in theirs if metric_direction(k) == "lower"}
    rules = [paired] if paired is not None else []
    common = sorted(ours & theirs)
    if not common and not rules:
        msg = "no gated eval metric (gate.regression_tasks) in common with the champion"
        if theirs:
            msg += f" (champion has {', '.join(sorted(theirs)[:6])}{'...' if len(theirs) > 6 else ''})"
        return [_rule("no_regression", True, None, None, msg)]
    unpaired = " (unpaired: no per-question record on both sides)"
    for key in common:
        v, c = _number(figures, key), _number(champion, key)
        name = f"no_regression.{key}"
        if not math.isfinite(c):
            rules.append(_rule(name, True, v, None, f"champion's {key} = {c} is not finite: nothing to compare"))
            continue
        if metric_direction(key) == "lower":
            bound = c * (1 + tol)
            ok = math.isfinite(v) and v <= bound
            msg = (f"{key} = {v:.4g} {'<=' if ok else '>'} champion {c:.4g} x (1 + {tol:g}) = {bound:.4g}"
                   " (lower is better)")
        else:
            bound = c - tol
            ok = math.isfinite(v) and v >= bound
            msg = f"{key} = {v:.4g} {'>=' if ok else '<'} champion {c:.4g} - {tol:g} = {bound:.4g}{unpaired}"
        rules.append(_rule(name, ok, v, bound, msg))
    missing = sorted(theirs - ours)
    if missing:
        # Not a failure by the rule's definition (compared: metrics present in both), but say so.
        rules.append(_rule("no_regression", True, None, None,
                           f"not compared, missing in this run: {', '.join(missing[:6])}{'...' if len(missing) > 6 else ''}"))
    return rules


def _floors(figures: Mapping[str, Any], p: GateParams) -> list[dict[str, Any]]:
    rules = []
    for key, floor in sorted(p.floors.items()):
        name = f"floor.{key}"
        v = _number(figures, key)
        if v is None:
            rules.append(_missing(name, key, floor, "the stage that produces it did not run or did not report it"))
        elif not math.isfinite(v):
            rules.append(_not_finite(name, key, v, floor))
        else:
            ok = v >= floor
            rules.append(_rule(name, ok, v, floor, f"{key} = {v:.4g} {'>=' if ok else '<'} floor {floor:g}"))
    return rules


def _max_perplexity(figures: Mapping[str, Any], p: GateParams) -> list[dict[str, Any]]:
    limit = p.max_perplexity
    if limit is None:
        return []
    keys = sorted(k for k in figures if metric_direction(k) == "lower" and "perplexity" in k.rsplit(".", 1)[-1])
    if not keys:
        return [_rule("max_perplexity", False, None, limit,
                      "no eval.*perplexity figure: the perplexity evaluation did not run")]
    rules = []
    for key in keys:
        v = _number(figures, key)
        name = f"max_perplexity.{key}"
        if v is None or not math.isfinite(v):
            rules.append(_rule(name, False, v, limit, f"{key} = {v} is not a finite number"))
            continue
        ok = v <= limit
        rules.append(_rule(name, ok, v, limit, f"{key} = {v:.4g} {'<=' if ok else '>'} gate.max_perplexity = {limit:g}"))
    return rules


def decide(figures: Mapping[str, float], champion: Mapping[str, float] | None, params: GateParams,
           answers: Mapping[str, Any] | None = None, champion_answers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply every rule; ``passed`` only when all pass. ``champion`` is the champion's figures or None;
    ``answers`` / ``champion_answers`` the per-question records of both (eval.json's ``answers``), when kept."""
    figures = dict(figures or {})
    rules = [
        _bit_exact(figures, params),
        _logit_error(figures, params),
        _decode_speedup(figures, params),
        *_no_regression(figures, champion, params, answers, champion_answers),
        *_floors(figures, params),
        *_max_perplexity(figures, params),
    ]
    failed = [r["rule"] for r in rules if not r["passed"]]
    return {"passed": not failed, "rules": rules, "failed": failed}
