"""The serve runner's SIGTERM handling (qalora_pipeline/flows/runner.py)."""

import asyncio
import os
import signal

import pytest


def test_sigterm_landing_in_a_catch_all_still_ends_the_runner_loop():
    """A SIGTERM that arrives while library code catches every exception (an anyio task group starting a flow run,
    in CI) still ends the event loop. Prefect's handler raised SystemExit right there, where it was swallowed and
    `qalora serve` kept serving; here the loop itself raises it."""
    from qalora_pipeline.flows.runner import StoppingRunner

    runner = StoppingRunner(name="sigterm-test", limit=1)
    swallowed = []

    async def serving() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside this try
            await asyncio.sleep(0)
        except BaseException as e:  # what the task group did with Prefect's SystemExit
            swallowed.append(type(e).__name__)
        await asyncio.sleep(0.5)  # polling on

    old = signal.signal(signal.SIGTERM, runner.handle_sigterm)
    try:
        with pytest.raises(SystemExit):
            asyncio.run(serving())
    finally:
        signal.signal(signal.SIGTERM, old)
    assert "SystemExit" not in swallowed
