"""Orchestration subcommands of ``qalora`` (registered by qalora/cli.py): run, data, gate, report, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def orchestration_env() -> None:
    """Prefect's home and ephemeral server under the project state dir; no telemetry."""
    from qalora.paths import state_dir

    for key, value in {"PREFECT_HOME": str(state_dir() / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                       "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")}.items():
        os.environ.setdefault(key, value)


def cmd_run(args: argparse.Namespace) -> int:
    orchestration_env()
    from flows.pipeline import qalora_pipeline

    result = qalora_pipeline(params_file=str(args.params), overrides=args.set or [], project_dir=str(args.project_dir),
                             scheduled=args.scheduled)
    # Prefect logs only warnings to the console by default, so the decision is printed here too.
    print(result["message"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("figures", "message")}, indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tasks import dvc_data

    root = args.project_dir
    if args.action == "build":
        md5 = dvc_data.build_and_track(root)
        print(f"data/ built and tracked: data.dvc md5 {md5} (commit data.dvc when it changed)")
    elif args.action == "status":
        print(f"data/ matches data.dvc: {dvc_data.verify(root)}")
    elif args.action == "push":
        dvc_data.push(root, args.remote)
        print("pushed data/ to the DVC remote")
    else:
        dvc_data.pull(root, args.remote)
        print(f"pulled data/: {dvc_data.verify(root)}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    orchestration_env()
    from qalora.config import load_params
    from tasks import mlflow_tracking

    p = load_params(args.params, args.set or [])
    mlflow_tracking.configure(p.tracking)
    decision = mlflow_tracking.regate(p.tracking.registered_model, args.version, p.gate)
    print(json.dumps(decision, indent=2, default=str))
    return 0 if decision.get("passed") else 1


def cmd_report(args: argparse.Namespace) -> int:
    from qalora.manifest import read_json
    from qalora.report import write_report

    summary = read_json(args.run / "summary.json", "run summary")
    decision = read_json(args.run / "decision.json", "gate decision")
    print(write_report(args.out or args.run, summary, decision))
    return 0


def cron_expression(value: str) -> str:
    """argparse type: a cron string Prefect accepts, checked before anything is served."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=value)
    except ValueError as e:  # pydantic's ValidationError: keep its one-line reason
        reason = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        raise argparse.ArgumentTypeError(f"invalid cron expression {value!r}: {reason} (five fields: minute hour "
                                         "day-of-month month day-of-week, e.g. '0 3 * * 1')") from None
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    orchestration_env()
    from flows.pipeline import qalora_pipeline

    qalora_pipeline.serve(
        name=args.name, cron=args.cron,
        parameters={"params_file": str(args.params), "overrides": args.set or [],
                    "project_dir": str(Path(args.project_dir).resolve()), "scheduled": True},
    )
    return 0


def add_cli(sub) -> None:
    def common(p: argparse.ArgumentParser, params: bool = True) -> None:
        if params:
            p.add_argument("--params", type=Path, default=Path("params/default.yaml"), help="experiment YAML")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param (repeatable)")
        p.add_argument("--project-dir", type=Path, default=Path("."), help="folder holding data/ and data.dvc")

    r = sub.add_parser("run", help="run the whole pipeline (Prefect flow, MLflow run, registry gate, report)")
    common(r)
    r.add_argument("--scheduled", action="store_true", help="skip when data, code and params equal the champion's")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("data", help="build / verify / push / pull the DVC-versioned data/")
    d.add_argument("action", choices=["build", "status", "push", "pull"])
    d.add_argument("--remote", help="DVC remote name (default: the default remote)")
    common(d, params=False)
    d.set_defaults(func=cmd_data)

    for name in ("gate", "promote"):
        g = sub.add_parser(name, help="re-evaluate the promotion gate for a registered model version")
        g.add_argument("--version", required=True, help="model version in the registry")
        common(g)
        g.set_defaults(func=cmd_gate)

    rp = sub.add_parser("report", help="re-render a run's report from its summary.json and decision.json")
    rp.add_argument("--run", type=Path, required=True, help="reports/<run> folder")
    rp.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    rp.set_defaults(func=cmd_report)

    s = sub.add_parser("serve", help="serve the pipeline on a cron schedule (Prefect serve) for scheduled retraining")
    common(s)
    s.add_argument("--cron", required=True, type=cron_expression, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    s.add_argument("--name", default="qalora-scheduled", help="deployment name")
    s.set_defaults(func=cmd_serve)
