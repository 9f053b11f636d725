"""The layering rules of docs/design.md hold: no import cycle, no core -> orchestration import."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_cycles_and_no_upward_imports():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py"), "--all-cycles", str(REPO)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
