"""The bad-input battery: every subcommand given something wrong answers with one line naming the
offending key, file or value and what is valid, exits 2 (bad input), leaves no output behind and
registers nothing. docs/bad-inputs.md is the table of these cases with the messages they print
(`python scripts/bad_inputs_table.py` regenerates it from this list)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import save_tiny_base, tiny_llama, tiny_tokenizer, write_alpaca

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"


@dataclass
class Env:
    """Inputs a case can use, all under one temp folder; ``out`` must not exist after a bad command."""

    root: Path
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.root / "out"

    @property
    def fp(self) -> Path:
        d = self.root / "fp"
        if not d.exists():
            tiny_llama().save_pretrained(d)
            tiny_tokenizer().save_pretrained(d)
        return d

    @property
    def base(self) -> Path:
        d = self.root / "base"
        return d if d.exists() else save_tiny_base(d)

    @property
    def other_base(self) -> Path:
        d = self.root / "base_seed1"
        return d if d.exists() else save_tiny_base(d, seed=1, group_size=64)

    @property
    def data(self) -> Path:
        p = self.root / "alpaca.json"
        return p if p.exists() else write_alpaca(p)

    @property
    def adapter(self) -> Path:
        from qalora_pipeline.cli import main

        d = self.root / "adapter"
        if not d.exists():
            assert main(["tune", "--base", str(self.base), "--data", str(self.data), "--out", str(d), "--steps", "1",
                         "--no-progress"]) == 0
        return d

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def copy_with(self, src: Path, name: str, edit: Callable[[Path], None]) -> Path:
        import shutil

        d = self.root / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def params(self, text: str) -> Path:
        return self.file("params.yaml", text)


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt_header(path: Path) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: tuple[str, ...]  # substrings of the error line
    code: int = 2
    env: dict[str, str] | None = None  # set: run `qalora` in a subprocess with these variables
    max_file_bytes: int | None = None  # set: ... whose files cannot grow past this (a full disk, portably)


Q = ["quantize", "--method", "rtn", "--no-progress"]
CASES = [
    # quantize
    Case("quantize-bits-5", lambda e: [*Q, "--model", str(e.fp), "--bits", "5", "--out", str(e.out)], ("quantize.bits",)),
    Case("quantize-group-48", lambda e: [*Q, "--model", str(e.fp), "--group-size", "48", "--out", str(e.out)],
         ("group_size=48", "valid group sizes")),
    Case("quantize-method-unknown", lambda e: ["quantize", "--model", str(e.fp), "--method", "awq", "--out", str(e.out)],
         ("--method", "awq")),
    Case("quantize-model-missing", lambda e: [*Q, "--model", str(e.root / "nope"), "--out", str(e.out)], ("nope",)),
    Case("quantize-pickle-only", lambda e: [*Q, "--model", str(e.copy_with(e.fp, "pkl", lambda d: (
        (d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")))), "--out", str(e.out)],
         ("safetensors only",)),
    Case("quantize-truncated-weights", lambda e: [*Q, "--model", str(e.copy_with(
        e.fp, "trunc", lambda d: truncate(d / "model.safetensors"))), "--out", str(e.out)], ("model.safetensors",)),
    Case("quantize-corrupt-header", lambda e: [*Q, "--model", str(e.copy_with(
        e.fp, "hdr", lambda d: _corrupt_header(d / "model.safetensors"))), "--out", str(e.out)], ("model.safetensors",)),
    Case("quantize-fake-gguf", lambda e: [*Q, "--model", str(e.file("fake.gguf", b"GGUF" + b"\0" * 60)), "--out",
                                          str(e.out)], ("fake.gguf",)),
    Case("quantize-uncached-hub-id", lambda e: [*Q, "--model", "someorg/not-cached", "--out", str(e.out)],
         ("not in the local HF cache",)),
    Case("quantize-out-is-a-file", lambda e: [*Q, "--model", str(e.fp), "--out", str(e.file("out", "mine"))],
         ("out", "not")),
    Case("quantize-out-holds-user-files", lambda e: [*Q, "--model", str(e.fp), "--out", str(
        e.file("out/notes.txt", "mine").parent)], ("out",)),
    # tune
    Case("tune-base-is-fp", lambda e: ["tune", "--base", str(e.fp), "--data", str(e.data), "--out", str(e.out)],
         ("fp",)),
    Case("tune-data-missing", lambda e: ["tune", "--base", str(e.base), "--data", str(e.root / "none.json"), "--out",
                                         str(e.out)], ("none.json",)),
    Case("tune-data-not-json", lambda e: ["tune", "--base", str(e.base), "--data", str(e.file("bad.json", "{oops")),
                                          "--out", str(e.out)], ("bad.json",)),
    Case("tune-data-empty", lambda e: ["tune", "--base", str(e.base), "--data", str(e.file("empty.json", "[]")),
                                       "--out", str(e.out)], ("empty.json",)),
    Case("tune-data-wrong-fields", lambda e: ["tune", "--base", str(e.base), "--data", str(
        e.file("fields.json", json.dumps([{"question": "q", "answer": "a"}]))), "--out", str(e.out)], ("fields.json",)),
    Case("tune-lr-nan", lambda e: ["tune", "--base", str(e.base), "--data", str(e.data), "--lr", "nan", "--out",
                                   str(e.out)], ("tune.lr",)),
    Case("tune-steps-0", lambda e: ["tune", "--base", str(e.base), "--data", str(e.data), "--steps", "0", "--out",
                                    str(e.out)], ("tune.steps",)),
    Case("tune-truncated-base", lambda e: ["tune", "--base", str(e.copy_with(
        e.base, "tbase", lambda d: truncate(d / "model.safetensors"))), "--data", str(e.data), "--out", str(e.out)],
         ("model.safetensors",)),
    Case("tune-base-missing-quant-config", lambda e: ["tune", "--base", str(e.copy_with(
        e.base, "nocfg", lambda d: (d / "qalora_quant.json").unlink())), "--data", str(e.data), "--out", str(e.out)],
         ("nocfg",)),
    # merge
    Case("merge-adapter-of-another-base", lambda e: ["merge", "--base", str(e.other_base), "--adapter", str(e.adapter),
                                                     "--out", str(e.out)], ("adapter",)),
    Case("merge-adapter-missing", lambda e: ["merge", "--base", str(e.base), "--adapter", str(e.root / "noad"), "--out",
                                             str(e.out)], ("noad",)),
    Case("merge-adapter-truncated", lambda e: ["merge", "--base", str(e.base), "--adapter", str(e.copy_with(
        e.adapter, "tad", lambda d: [truncate(p) for p in d.glob("*.safetensors")])), "--out", str(e.out)],
         ("tad",)),
    # check
    Case("check-merged-missing", lambda e: ["check", "--base", str(e.base), "--adapter", str(e.adapter), "--merged",
                                            str(e.root / "nomerged")], ("nomerged",)),
    Case("check-rel-tol-negative", lambda e: ["check", "--base", str(e.base), "--adapter", str(e.adapter), "--merged",
                                              str(e.base), "--rel-tol", "-1"], ("rel",)),
    # bench
    Case("bench-batch-0", lambda e: ["bench", "--model", str(e.base), "--batch", "0"], ("--batch", "0")),
    Case("bench-batch-not-a-number", lambda e: ["bench", "--model", str(e.base), "--batch", "one"], ("--batch", "one")),
    Case("bench-model-missing", lambda e: ["bench", "--model", str(e.root / "nobench")], ("nobench",)),
    # eval
    Case("eval-negative-fewshot", lambda e: ["eval", "--model", str(e.base), "--tasks", "arc_easy", "--num-fewshot",
                                             "arc_easy=-3"], ("--num-fewshot", "-3")),
    Case("eval-unknown-task", lambda e: ["eval", "--model", str(e.base), "--tasks", "nosuchtask"], ("nosuchtask",)),
    Case("eval-limit-0", lambda e: ["eval", "--model", str(e.base), "--tasks", "arc_easy", "--limit", "0"],
         ("--limit", "0")),
    Case("eval-limit-garbage", lambda e: ["eval", "--model", str(e.base), "--tasks", "arc_easy", "--limit",
                                          "arc_easy=abc"], ("--limit", "abc")),
    Case("eval-model-missing", lambda e: ["eval", "--model", str(e.root / "noeval"), "--tasks", "arc_easy"],
         ("noeval",)),
    # export
    Case("export-format-unknown", lambda e: ["export", "--model", str(e.base), "--format", "onnx", "--out", str(e.out)],
         ("--format", "onnx")),
    Case("export-model-is-fp", lambda e: ["export", "--model", str(e.fp), "--format", "gguf", "--out", str(e.out)],
         ("fp",)),
    # params (run, gate, ...)
    Case("run-params-missing", lambda e: ["run", "--params", str(e.root / "none.yaml"), "--project-dir", str(e.root)],
         ("none.yaml",)),
    Case("run-params-unknown-key", lambda e: ["run", "--params", str(e.params("tune:\n  learning_rate: 1\n")),
                                              "--project-dir", str(e.root)], ("tune.learning_rate",)),
    Case("run-params-not-yaml", lambda e: ["run", "--params", str(e.params("tune: [unclosed\n")), "--project-dir",
                                           str(e.root)], ("params.yaml",)),
    Case("run-set-without-equals", lambda e: ["run", "--set", "tune.steps", "--params", str(e.params("name: x\n")), "--project-dir", str(e.root)],
         ("tune.steps",)),
    Case("run-set-wrong-type", lambda e: ["run", "--set", "tune.steps=many", "--params", str(e.params("name: x\n")), "--project-dir", str(e.root)],
         ("tune.steps",)),
    Case("run-no-data-dvc", lambda e: ["run", "--params", str(e.params("name: x\n")), "--project-dir", str(e.root)],
         ("data.dvc",)),
    Case("gate-model-never-registered", lambda e: ["gate", "--version", "99999", "--params", str(e.params("name: x\n")),
                                                   "--project-dir", str(e.root)],
         ("does not exist", "tracking.registered_model")),
    Case("promote-without-reason", lambda e: ["promote", "--version", "1", "--reason", " ", "--params", str(e.params("name: x\n")), "--project-dir",
                                              str(e.root)], ("--reason",)),
    Case("rollback-model-never-registered", lambda e: ["rollback", "--params", str(e.params("name: x\n")),
                                                       "--project-dir", str(e.root)],
         ("does not exist", "tracking.registered_model")),
    Case("serve-bad-cron", lambda e: ["serve", "--cron", "61 * * * *", "--project-dir", str(e.root)], ("--cron",)),
    Case("tune-loss-nan-mid-run", lambda e: ["tune", "--base", str(e.base), "--data", str(e.data), "--out", str(e.out),
                                             "--steps", "30", "--lr", "10000", "--save-every", "2",
                                             "--set", "tune.max_grad_norm=0", "--no-progress"],
         ("the loss became nan at step", "last good checkpoint is", "out.checkpoints/step-")),
    Case("tune-resume-corrupt-checkpoint", lambda e: _corrupt_checkpoint(e), ("optimizer.safetensors", "not readable",
                                                                               "delete")),
    Case("quantize-disk-full", lambda e: [*Q, "--model", str(e.fp), "--out", str(e.out)], ("File too large",),
         max_file_bytes=20_000),
    Case("gate-mlflow-unreachable", lambda e: ["gate", "--version", "1", "--params", str(e.params("name: x\n")),
                                               "--set", "tracking.tracking_uri=http://127.0.0.1:9"],
         ("MLflow server is unreachable", "http://127.0.0.1:9", "nothing was registered"),
         env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}),
    Case("serve-prefect-unreachable", lambda e: ["serve", "--interval", "60", "--params", str(e.params("name: x\n")),
                                                 "--project-dir", str(e.root)],
         ("Prefect API is unreachable", "http://127.0.0.1:9/api"), env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}),
    Case("serve-interval-0", lambda e: ["serve", "--interval", "0", "--project-dir", str(e.root)], ("--interval",)),
]


def _corrupt_checkpoint(e: Env) -> list[str]:
    """A tune that stopped (NaN at step 3) leaving its step-2 checkpoint, whose optimizer file is then cut:
    the same command again resumes from that checkpoint."""
    from qalora_pipeline.cli import main

    argv = ["tune", "--base", str(e.base), "--data", str(e.data), "--out", str(e.out), "--steps", "30", "--lr",
            "10000", "--save-every", "2", "--set", "tune.max_grad_norm=0", "--no-progress"]
    assert main(argv) == 2
    truncate(next(e.root.glob("out.checkpoints/step-*/optimizer.safetensors")))
    return argv


def _subprocess(argv: list[str], env: dict[str, str], max_file_bytes: int | None) -> tuple[int, str]:
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():  # past the limit a write fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.run([str(Path(sys.executable).parent / "qalora"), *argv], env=os.environ | env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit if max_file_bytes else None)
    return proc.returncode, proc.stderr


def run_case(case: Case, root: Path) -> tuple[int, str, list[str]]:
    """Run one case (in-process, or in a subprocess when it sets env or a file size limit) with its inputs
    under ``root``; returns (exit code, what it printed to stderr, the arguments it ran)."""
    import contextlib
    import io

    from qalora_pipeline.cli import main

    env = Env(root)
    argv = case.argv(env)
    if case.env is not None or case.max_file_bytes is not None:
        return (*_subprocess(argv, case.env or {}, case.max_file_bytes), argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue(), argv


def error_line(err: str) -> str:
    """The last line that is not a warning: the error a user reads."""
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_nothing(case, tmp_path, state_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err, _ = run_case(case, tmp_path)
    assert rc == case.code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = error_line(err)
    assert all(s in last for s in case.expect), f"{case.id}: {last!r} lacks {case.expect}"
    out = tmp_path / "out"
    assert not out.exists() or case.id.startswith("quantize-out-") and not any(
        p.name.startswith("qalora") for p in out.rglob("*")), sorted(out.rglob("*"))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # no half-written artifact
    registry = state_dir / "mlflow"
    assert not registry.exists() or not list(registry.rglob("MLmodel"))  # nothing registered


def test_the_docs_table_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing and len(CASES) >= 40, missing
