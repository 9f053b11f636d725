"""Speed cost of the deterministic numeric mode (qalora/numerics.py), peers in one run.

Runs `qalora tune` for a few steps on one quantized base under QALORA_NUMERICS=deterministic and
=native, alternating (so drift in machine load hits both alike), and reports seconds per step from
each run's own metrics (train_seconds / steps: model loading excluded). Writes JSON.

    python benchmarks/numerics_cost.py --base DIR [--steps 8] [--rounds 2] --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QALORA = str(Path(sys.executable).parent / "qalora")


def tune_seconds_per_step(base: str, steps: int, mode: str, out: Path) -> tuple[float, str]:
    env = os.environ | {"QALORA_NUMERICS": mode}
    proc = subprocess.run([QALORA, "tune", "--base", base, "--out", str(out), "--steps", str(steps),
                           "--save-every", "1000", "--no-progress"], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["metrics"]["train_seconds"] / steps, manifest["numerics"]["key"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="quantized base folder (qalora quantize --out)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"deterministic": [], "native": []}
    keys = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("deterministic", "native"):
                s, keys[mode] = tune_seconds_per_step(args.base, args.steps, mode, Path(tmp) / f"{mode}-{r}")
                times[mode].append(s)
                print(f"round {r} {mode:13s} {s:.3f} s/step ({keys[mode]})", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {"command": " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
              "steps": args.steps, "rounds": args.rounds, "seconds_per_step": times, "median": med,
              "numerics": keys, "deterministic_over_native": med["deterministic"] / med["native"]}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"deterministic / native seconds per step: {result['deterministic_over_native']:.3f}")


if __name__ == "__main__":
    main()
