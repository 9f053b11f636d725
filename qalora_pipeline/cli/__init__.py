"""The ``qalora`` command line, assembled here on the orchestration side (the console script).

One subcommand per stage, each running alone on folders (:mod:`.stages`: quantize, tune, merge,
check, eval, bench), and the pipeline's commands (:mod:`.pipeline`: run, data, gate, promote,
rollback, rebuild, report, serve). Every command reads the experiment schema (``--params FILE``,
``--set key=value``); stage flags are shorthands for the matching keys (``--bits 3`` is
``--set quantize.bits=3``).

Importing this module sets the process up before torch loads: no hub access and no telemetry
(unless the user set these variables) and the numeric mode (:mod:`qalora.numerics`).
"""

from __future__ import annotations

import argparse
import os
import sys

from qalora import numerics

# No hub access and no telemetry at run time, unless the user explicitly set these.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
# Before torch runs: the numeric mode decides which kernels every library picks (qalora/numerics.py).
# A bad QALORA_NUMERICS is reported by main(), as one line.
try:
    numerics.pin()
except ValueError:
    pass

from qalora_pipeline.cli import pipeline, stages  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qalora", description="Fine-tune LLMs in low bit with QA-LoRA: "
                                     "one subcommand per stage, and the pipeline around them.")
    sub = parser.add_subparsers(dest="command", required=True)
    stages.add_commands(sub)
    pipeline.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        numerics.activate()
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        if os.environ.get("QALORA_DEBUG"):
            raise
        print(f"qalora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
