"""Crash points: where a test can make the process die as a ``kill -9`` or a power cut would.

``QALORA_CRASH_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default the
first) it reaches ``crash_point(<point>)``: no ``finally`` block, atexit hook or signal handler
runs, so what is left on disk is exactly what a real crash leaves. Points are named
``<stage>.commit`` (every artifact written into its temporary folder, not yet renamed into place;
:func:`qalora.manifest.atomic_output_dir`), the stage being ``quantize``, ``tune``,
``tune-checkpoint``, ``merge``, ``check``, ``benchmark``, ``evaluate``, ``export``, ``report``.
Unset (always, outside tests), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "QALORA_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
