"""A real local Prefect server for `qalora serve` when the user has none (``PREFECT_API_URL`` unset).

Prefect's ephemeral in-process API cannot schedule (its runner says so and never starts a run): the
scheduler is a service of ``prefect server start``. So serve starts one, on loopback, with its
database under ``$QALORA_HOME/prefect`` (runs and schedules survive a restart), and stops it on exit.
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

STARTUP_TIMEOUT_S = 180


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
def local_server(home: Path, port: int | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 with PREFECT_HOME=``home``; yield its API URL.

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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
