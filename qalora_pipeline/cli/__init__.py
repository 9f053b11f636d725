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
    except Exception as e:
        message = _service_failure(e)
        if message is None or os.environ.get("QALORA_DEBUG"):
            raise
        print(f"qalora {args.command}: error: {message}", file=sys.stderr)
        return 2


def _service_failure(e: Exception) -> str | None:
    """One line for a service that could not be reached (MLflow, the Prefect API) or an OS error such as a
    full disk; None for anything else (a bug: its traceback is worth seeing). Checks only modules already
    imported, so it imports nothing."""
    mlflow_exc = getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", None)
    if mlflow_exc is not None and isinstance(e, mlflow_exc):
        text = " ".join(str(e).split())
        if "Max retries exceeded" in text or "Failed to establish" in text or "Connection refused" in text:
            url = text.split("API request to ", 1)[-1].split(" ", 1)[0]
            return (f"the MLflow server is unreachable ({url.split('/api/', 1)[0]}; tracking.tracking_uri or "
                    "MLFLOW_TRACKING_URI) after MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES); nothing was registered")
        return f"MLflow: {text}"
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(e, httpx.TransportError):
        return (f"the Prefect API is unreachable ({os.environ.get('PREFECT_API_URL') or 'PREFECT_API_URL'}): "
                f"{e or type(e).__name__}; start it or unset PREFECT_API_URL to run without a server")
    if isinstance(e, OSError):  # disk full, file too large, permission denied: the path is in the message
        return str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
