"""Paired comparison of two models on the same questions: the statistics behind the no-regression gate.

Two models answer the same questions, so their accuracies are correlated: comparing the two
accuracies with a tolerance (each with stderr ~0.1 at 20 questions) decides on noise. What carries
the information is the questions on which they *disagree*: ``b`` the champion answered right and the
challenger wrong, ``c`` the reverse. Under "no difference" each disagreement is a fair coin, so the
exact one-sided McNemar test asks whether ``b`` is improbably large among ``b + c``.

Per-question records (``answers``) are what :func:`qalora.evaluate.evaluate` stores::

    {"<task>": {"groups": ["mmlu_stem", "mmlu"], "metric": "acc",
                "docs": {"<doc_id>": [correct 0|1, "<first 16 hex of lm-eval's doc_hash>"]}}}

A question is paired when both records hold the same task, doc id and doc hash (a changed data set
changes the hash: those questions are not compared).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

POWER = 0.8  # the power at which the minimum detectable difference is stated


@dataclass(frozen=True)
class PairedComparison:
    """Challenger vs champion on ``n`` paired questions; accuracies and differences are fractions of ``n``."""

    n: int
    champion_acc: float
    challenger_acc: float
    only_champion: int  # b: the champion right, the challenger wrong
    only_challenger: int  # c: the reverse
    delta: float  # challenger_acc - champion_acc
    ci_low: float  # two-sided interval for delta at `confidence`
    ci_high: float
    p_worse: float  # exact one-sided McNemar p-value for "the challenger is worse"
    mdd: float  # smallest true drop detected with probability POWER at `confidence` (observed discordance)
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binomial_upper_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic)."""
    if k <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def two_sided_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` disagreements (twice the smaller tail, at most 1)."""
    return min(1.0, 2 * _binomial_upper_tail(max(b, c), b + c))


def compare(champion: Mapping[str, int], challenger: Mapping[str, int], confidence: float = 0.95) -> PairedComparison:
    """Compare per-question correctness ``{question key: 0|1}`` on the keys both hold.

    The interval for the difference is the paired Wald interval; the minimum detectable difference uses
    the observed share of disagreements (at least one question), one-sided at ``confidence``, power 0.8.
    """
    keys = sorted(set(champion) & set(challenger))
    n = len(keys)
    if n == 0:
        raise ValueError("no question answered by both models: nothing to compare")
    b = sum(1 for k in keys if champion[k] and not challenger[k])
    c = sum(1 for k in keys if challenger[k] and not champion[k])
    acc_champ = sum(1 for k in keys if champion[k]) / n
    acc_chal = sum(1 for k in keys if challenger[k]) / n
    delta = (c - b) / n
    z = NormalDist()
    se = math.sqrt(max((b + c) / n - delta ** 2, 0.0) / n)
    half = z.inv_cdf(0.5 + confidence / 2) * se
    discordance = max(b + c, 1) / n
    mdd = (z.inv_cdf(confidence) + z.inv_cdf(POWER)) * math.sqrt(discordance / n)
    return PairedComparison(n=n, champion_acc=acc_champ, challenger_acc=acc_chal, only_champion=b,
                            only_challenger=c, delta=delta, ci_low=delta - half, ci_high=delta + half,
                            p_worse=_binomial_upper_tail(b, b + c), mdd=mdd, confidence=confidence)


def gated_correctness(answers: Mapping[str, Any] | None, patterns: Iterable[str]) -> dict[str, int]:
    """``{"task:doc_id:hash": 0|1}`` for the questions of every task that, or one of whose groups, matches
    one of ``patterns`` (``gate.regression_tasks``)."""
    patterns = list(patterns)
    out: dict[str, int] = {}
    for task, record in (answers or {}).items():
        names = [task, *record.get("groups", [])]
        if not any(fnmatch.fnmatchcase(name, p) for name in names for p in patterns):
            continue
        for doc_id, (correct, doc_hash) in record.get("docs", {}).items():
            out[f"{task}:{doc_id}:{doc_hash}"] = int(bool(correct))
    return out
