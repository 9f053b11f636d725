"""Serving a flow on a schedule with a Prefect runner that always stops on SIGTERM.

Prefect's ``Runner.handle_sigterm`` (3.x, what ``Flow.serve`` runs) raises ``SystemExit`` from the signal handler,
i.e. in whatever code the main thread is running. When that is a flow run being started inside an anyio task group,
the exit becomes that run's "could not start" error and the runner keeps polling: ``qalora serve`` then went on
retraining on schedule after SIGTERM (CI, 2026-12-05: four more model versions registered before the test killed it).
:class:`StoppingRunner` raises the exit from a callback of the event loop instead, where only the loop sees it, so it
ends ``asyncio.run`` as Prefect's does when it lands outside library code.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from prefect import Flow
from prefect.runner import Runner


def _exit() -> None:
    sys.exit(0)


class StoppingRunner(Runner):
    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        """SIGTERM: exit from the event loop's own frame (see the module docstring); before the loop runs, here."""
        self._logger.info("SIGTERM received, shutting down")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the loop is not running yet: nothing to swallow the exit
            _exit()
        else:
            loop.call_soon_threadsafe(_exit)


def serve(flow: Flow, name: str, parameters: dict[str, Any], limit: int, global_limit: Any, **schedule: Any) -> None:
    """``flow.serve(name, parameters=..., limit=..., global_limit=..., cron= / interval=)`` on a
    :class:`StoppingRunner`; blocks until SIGTERM or Ctrl-C. The deployment's schedule is paused on shutdown, as
    ``Flow.serve`` does."""
    runner = StoppingRunner(name=name, pause_on_shutdown=True, limit=limit)
    runner.add_flow(flow, name=name, parameters=parameters, concurrency_limit=global_limit, **schedule)
    print(f"qalora serve: flow {flow.name!r} served as deployment '{flow.name}/{name}', polling for scheduled runs",
          flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
