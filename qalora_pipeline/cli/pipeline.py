"""Pipeline subcommands: run, data, gate, promote, rollback, rebuild, report, serve (Prefect, MLflow, DVC)."""

from __future__ import annotations

import argparse
import json
import os
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
    from qalora.config import load_params
    from qalora_pipeline import data_version, tracking
    from qalora_pipeline.flows.pipeline import qalora_pipeline

    # Bad params or data fail here, in one line, before Prefect starts a run (which logs a traceback).
    params = load_params(args.params, args.set or [])
    data_version.verify(Path(args.project_dir).resolve())
    tracking.configure(params.tracking)  # an unreachable MLflow server fails here, before any training
    result = qalora_pipeline(params_file=str(args.params), overrides=args.set or [], project_dir=str(args.project_dir),
                             scheduled=args.scheduled)
    # Prefect logs only warnings to the console by default, so the decision is printed here too.
    print(result["message"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("figures", "message")}, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """The accuracy sweep (flows/sweep.py), or with ``--report-only`` its report from the MLflow runs so far."""
    orchestration_env()
    from qalora.config import load_params
    from qalora.paths import resolve_path
    from qalora_pipeline import data_version, tracking

    params = load_params(args.params, args.set or [])
    tracking.configure(params.tracking)
    root = Path(args.project_dir).resolve()
    if args.report_only:
        from qalora_pipeline.flows.sweep import write_sweep_report

        print(f"report: {write_sweep_report(params, resolve_path(params.sweep.report, root))}")
        return 0
    data_version.verify(root)
    from qalora_pipeline.flows.sweep import qalora_sweep

    result = qalora_sweep(params_file=str(args.params), overrides=args.set or [], project_dir=str(root))
    print(json.dumps(result, indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from qalora_pipeline import data_version

    root = args.project_dir
    if args.action == "build":
        md5 = data_version.build_and_track(root)
        print(f"data/ built and tracked: data.dvc md5 {md5} (commit data.dvc when it changed)")
    elif args.action == "status":
        print(f"data/ matches data.dvc: {data_version.verify(root)}")
    elif args.action == "push":
        data_version.push(root, args.remote)
        print("pushed data/ to the DVC remote")
    else:
        data_version.pull(root, args.remote)
        print(f"pulled data/: {data_version.verify(root)}")
    return 0


def _registry_params(args: argparse.Namespace):
    """The params (gate rules, registered model) with MLflow pointed at their tracking store."""
    orchestration_env()
    from qalora.config import load_params
    from qalora_pipeline import tracking

    p = load_params(args.params, args.set or [])
    tracking.configure(p.tracking)
    return p


def cmd_gate(args: argparse.Namespace) -> int:
    """Read-only: print the decision ``--version`` would get against the current champion; exit 0 pass, 1 fail."""
    from qalora_pipeline import tracking

    p = _registry_params(args)
    decision = tracking.gate_version(p.tracking.registered_model, args.version, p.gate)
    print(json.dumps(decision, indent=2, default=str))
    return 0 if decision.get("passed") else 1


def cmd_promote(args: argparse.Namespace) -> int:
    """Move ``champion`` to ``--version`` by hand (gate-checked unless ``--force``), recorded with ``--reason``."""
    from qalora_pipeline import tracking

    p = _registry_params(args)
    entry = tracking.promote(p.tracking.registered_model, args.version, p.gate, args.reason, force=args.force)
    print(json.dumps(entry, indent=2, default=str))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move ``champion`` back to ``previous-champion``, recorded with ``--reason``."""
    from qalora_pipeline import tracking

    p = _registry_params(args)
    print(json.dumps(tracking.rollback(p.tracking.registered_model, args.reason), indent=2, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qalora.manifest import read_json
    from qalora.report import write_report

    summary = read_json(args.run / "summary.json", "run summary")
    decision = read_json(args.run / "decision.json", "gate decision")
    print(write_report(args.out or args.run, summary, decision))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Re-run a version's quantize, tune and merge from its lineage; exit 0 identical bytes, 1 different."""
    from qalora_pipeline import rebuild

    p = _registry_params(args)
    result = rebuild.rebuild(p.tracking.registered_model, args.version, args.project_dir, args.out,
                             progress=not args.no_progress)
    if args.json:
        from qalora.manifest import write_json_atomic

        write_json_atomic(args.json, result)
    print("\n".join(rebuild.summary_lines(result)))
    return 0 if result["identical"] else 1


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


def _seconds(value: str) -> float:
    """argparse type: a finite interval > 0 seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds > 0 (e.g. 3600 for hourly)")
    return seconds


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the pipeline on a schedule; without PREFECT_API_URL, on a local Prefect server started here."""
    orchestration_env()
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from qalora_pipeline.flows.local_server import local_server, stop_runs
    from qalora_pipeline.flows.pipeline import qalora_pipeline
    from qalora_pipeline.flows.runner import serve as serve_flow
    from qalora.paths import state_dir

    def serve(server_pid: int | None = None) -> None:
        try:
            serve_flow(
                qalora_pipeline, name=args.name, **({"cron": args.cron} if args.cron else {"interval": args.interval}),
                parameters={"params_file": str(args.params), "overrides": args.set or [],
                            "project_dir": str(Path(args.project_dir).resolve()), "scheduled": True},
                # A run still going when the next is due: the new one is cancelled, never a second copy on the state.
                limit=1, global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            )
        finally:  # SIGTERM / Ctrl-C: a run in progress ends with serve (and before its server), not minutes later
            if stopped := stop_runs(keep=server_pid):
                print(f"qalora serve: stopped {len(stopped)} run process(es) still going", flush=True)

    if PREFECT_API_URL.value():
        serve()
        return 0
    home = state_dir() / "prefect"
    with local_server(home, args.port) as server, temporary_settings({PREFECT_API_URL: server.url}):
        print(f"qalora serve: local Prefect server (API, scheduler, UI) at {server.url.removesuffix('/api')}, state in "
              f"{home}; it stops with serve. Set PREFECT_API_URL to use your own server instead.", flush=True)
        serve(server.pid)
    return 0


def add_commands(sub) -> None:
    """Register the pipeline subcommands on an argparse subparsers object."""

    def common(p: argparse.ArgumentParser, params: bool = True) -> None:
        if params:
            p.add_argument("--params", type=Path, default=Path("params/default.yaml"), help="experiment YAML")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param (repeatable)")
        p.add_argument("--project-dir", type=Path, default=Path("."), help="folder holding data/ and data.dvc")

    r = sub.add_parser("run", help="run the whole pipeline (Prefect flow, MLflow run, registry gate, report)")
    common(r)
    r.add_argument("--scheduled", action="store_true", help="skip when data, code and params equal the champion's")
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="the accuracy sweep: QA-LoRA vs QLoRA->GPTQ, GPTQ alone and LoRA on fp at each "
                                      "bits x group of the params' `sweep` section (cached stages, one MLflow run "
                                      "per variant), then the report (sweep.report)")
    common(sw)
    sw.add_argument("--report-only", action="store_true", help="only rebuild the report from the sweep's MLflow runs")
    sw.set_defaults(func=cmd_sweep, params=Path("params/accuracy.yaml"))

    d = sub.add_parser("data", help="build / verify / push / pull the DVC-versioned data/")
    d.add_argument("action", choices=["build", "status", "push", "pull"])
    d.add_argument("--remote", help="DVC remote name (default: the default remote)")
    common(d, params=False)
    d.set_defaults(func=cmd_data)

    version_help = "registered model version: N, an alias (champion, challenger, ...) or models:/NAME@ALIAS"
    g = sub.add_parser("gate", help="read-only: print the gate decision a registered version would get against "
                                    "the current champion (exit 0 pass, 1 fail); moves nothing")
    g.add_argument("--version", required=True, help=version_help)
    common(g)
    g.set_defaults(func=cmd_gate)

    pr = sub.add_parser("promote", help="make a registered version the champion by hand (it must pass the gate "
                                        "unless --force); recorded with who, when, why")
    pr.add_argument("--version", required=True, help=version_help)
    pr.add_argument("--reason", required=True, help="why (recorded in the version's tags and the audit log)")
    pr.add_argument("--force", action="store_true", help="promote even though the version fails the gate")
    common(pr)
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="move champion back to previous-champion; recorded with who, when, why")
    rb.add_argument("--reason", help="why (recorded in the version's tags and the audit log)")
    common(rb)
    rb.set_defaults(func=cmd_rollback)

    rbd = sub.add_parser("rebuild", help="re-run a registered version's quantize, tune and merge from its recorded "
                                         "lineage and compare every file's sha256 (exit 0 identical, 1 different)")
    rbd.add_argument("--version", required=True, help=version_help)
    rbd.add_argument("--out", type=Path, help="folder for the rebuilt stages (default: new under $QALORA_HOME/rebuild)")
    rbd.add_argument("--json", type=Path, help="also write the comparison here")
    rbd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    common(rbd)
    rbd.set_defaults(func=cmd_rebuild)

    rp = sub.add_parser("report", help="re-render a run's report from its summary.json and decision.json")
    rp.add_argument("--run", type=Path, required=True, help="reports/<run> folder")
    rp.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    rp.set_defaults(func=cmd_report)

    s = sub.add_parser("serve", help="serve the pipeline on a schedule for retraining (Prefect serve); starts a local "
                                    "Prefect server with its state under $QALORA_HOME unless PREFECT_API_URL is set")
    common(s)
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", type=cron_expression, help='cron expression in UTC, e.g. "0 3 * * 1" (Mondays 03:00)')
    when.add_argument("--interval", type=_seconds, metavar="SECONDS", help="run every SECONDS instead of on a cron")
    s.add_argument("--name", default="qalora-scheduled", help="deployment name")
    s.add_argument("--port", type=int, help="port of the local Prefect server started when PREFECT_API_URL is "
                                            "unset (default: a free port)")
    s.set_defaults(func=cmd_serve)
