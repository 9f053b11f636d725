"""The processes `qalora serve` owns: a real local Prefect server when the user has none
(``PREFECT_API_URL`` unset), and the flow-run processes its runner starts.

Prefect's ephemeral in-process API cannot schedule (its runner says so and never starts a run): the
scheduler is a service of ``prefect server start``. So serve starts one, on loopback, with its
database under ``$QALORA_HOME/prefect`` (runs and schedules survive a restart), and stops it on exit.

Prefect's runner does not stop a run in progress when serve gets SIGTERM: the run's process kept
tuning for minutes after serve's server was gone, failing to report, and held serve's stdout open
(measured with Prefect 3.8.8). :func:`stop_runs` ends them first, while the server can still record
that they crashed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

STARTUP_TIMEOUT_S = 180
RUN_STOP_GRACE_S = 30  # SIGTERM, then SIGKILL: the run's stage writes nothing half-done (atomic folders)


class LocalServer(NamedTuple):
    url: str  # the API URL, http://127.0.0.1:<port>/api
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(home: Path, port: int | None = None) -> Iterator[LocalServer]:
    """Start ``prefect server start`` on 127.0.0.1 with PREFECT_HOME=``home``; yield its URL and pid.

    The server inherits the environment, so Prefect's own settings apply (e.g.
    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS, 60 s by default: how often runs are scheduled).
    Its log is ``home/server.log``; a server that does not come up raises with the log's tail.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the local Prefect server did not start on port {port} "
                                   f"(exit code {proc.poll()}); its log {log_path} ends:\n{tail}")
            time.sleep(1)
        yield LocalServer(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_runs(keep: int | None = None, grace_s: float = RUN_STOP_GRACE_S) -> list[int]:
    """Stop every process this one started (flow runs and what they started), except ``keep`` (the local
    server's pid) and its own: SIGTERM, ``grace_s`` to exit, then SIGKILL. Returns the pids stopped."""
    import psutil

    me = psutil.Process()
    spared = set()
    if keep is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            server = psutil.Process(keep)
            spared = {keep, *(p.pid for p in server.children(recursive=True))}
    procs = [p for p in me.children(recursive=True) if p.pid not in spared]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in procs]
