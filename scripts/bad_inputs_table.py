"""Regenerate docs/bad-inputs.md: run every case of tests/qalora_pipeline/test_bad_inputs.py and write
what the user typed, the exit code and the line printed. Usage: python scripts/bad_inputs_table.py"""

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # the package, before tests/qalora (a folder of the same name)
sys.path += [str(REPO / "tests"), str(REPO / "tests" / "qalora_pipeline")]

from test_bad_inputs import CASES, DOC, error_line, run_case  # noqa: E402

HEADER = """# Bad inputs and what qalora says

Every case is a test (`tests/qalora_pipeline/test_bad_inputs.py`): exit code 2, one line naming what is
wrong and what is valid, no traceback, no output folder or `.partial` left behind, nothing registered.
Paths are shortened to their last part. Regenerate with `python scripts/bad_inputs_table.py`.

| case | command | exit | message |
|---|---|---|---|
"""


def short(text: str, root: Path) -> str:
    """Temp paths relative to the case's folder; pipes escaped for the table."""
    return text.replace(str(root) + "/", "").replace(str(root), ".").replace("|", "\\|")


def main() -> None:
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ["QALORA_HOME"] = str(root / "state")
            os.chdir(root)
            rc, err, argv = run_case(case, root)
            line, command = short(error_line(err), root), short(" ".join(argv), root)
        env = " ".join(f"{k}={v}" for k, v in (case.env or {}).items())
        limit = f"(files limited to {case.max_file_bytes} bytes) " if case.max_file_bytes else ""
        rows.append(f"| `{case.id}` | {limit}`{(env + ' ') if env else ''}qalora {command}` | {rc} | {line} |")
        print(rows[-1], flush=True)
    DOC.write_text(HEADER + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
