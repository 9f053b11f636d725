"""Calibration of the paired no-regression gate (qalora.paired): simulated evaluations where the two
models disagree on a share ``d`` of the questions, at no true difference and at a true drop equal to
the minimum detectable difference the gate states. A calibrated gate rejects ~5% of equal models
(one-sided 95%) and ~80% of models worse by the stated MDD.

    python benchmarks/gate_power.py --json benchmarks/results/gate_power.json
"""

from __future__ import annotations

import argparse
import json
import random

from qalora.paired import compare


def simulate(n: int, discordance: float, drop: float, trials: int, rng: random.Random) -> float:
    """Share of ``trials`` evaluations of ``n`` questions in which the gate finds the challenger worse."""
    p_champion_only = (discordance + drop) / 2  # E[(c - b) / n] = -drop
    rejected = 0
    for _ in range(trials):
        champ, chal = {}, {}
        for i in range(n):
            u = rng.random()
            champ[i], chal[i] = (1, 0) if u < p_champion_only else (0, 1) if u < discordance else (1, 1)
        rejected += compare(champ, chal).p_worse < 0.05
    return rejected / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for n in (254, 464, 1000, 14042):  # default before (20/task), default now (50/task), 1k, full MMLU
        for d in (0.1, 0.25):
            half = round(d * n / 2)
            mdd = compare({i: int(i < half) for i in range(n)}, {i: int(half <= i < 2 * half) for i in range(n)}).mdd
            trials = args.trials if n < 5000 else args.trials // 10
            row = {"questions": n, "discordance": d, "mdd": round(mdd, 4),
                   "rejects_equal": simulate(n, d, 0.0, trials, rng),
                   "rejects_drop_of_mdd": simulate(n, d, mdd, trials, rng), "trials": trials}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/gate_power.py", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
