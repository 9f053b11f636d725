"""Code versions: a stage's cache key changes with the code it can run, and only with that.
Output paths: a stage replaces only an earlier output of its own stage (``--out`` never destroys)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import qalora
from qalora.manifest import _import_closure, atomic_output_dir, check_output_path, code_version


@pytest.fixture
def package(tmp_path, monkeypatch):
    """pkgx: ``a`` imports ``b`` lazily inside a function; ``c`` is never imported; data in a subfolder."""
    root = tmp_path / "pkgx"
    (root / "prompts").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from pkgx.b import g\n    return g()\n")
    (root / "b.py").write_text("import os\n\ndef g():\n    return 1\n")
    (root / "c.py").write_text("X = 1\n")
    (root / "prompts" / "task.yaml").write_text("prompt: x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m.split(".")[0] == "pkgx"]:
        del sys.modules[name]


def test_code_version_follows_imports_only(package):
    before = code_version("pkgx.a")
    (package / "c.py").write_text("X = 2\n")  # not imported by a: same version
    assert code_version("pkgx.a") == before
    (package / "b.py").write_text("def g():\n    return 2\n")  # lazily imported: new version
    after_b = code_version("pkgx.a")
    assert after_b != before
    (package / "prompts" / "task.yaml").write_text("prompt: y\n")  # package data: new version
    assert code_version("pkgx.a") != after_b


def test_stage_closures_separate_kernels_from_tune():
    repo = Path(qalora.__file__).resolve().parents[1]
    names = {p.relative_to(repo).as_posix() for p in _import_closure(("qalora_pipeline.tasks.tune",))}
    assert "qalora/tune.py" in names and "qalora_pipeline/tasks/stage_cache.py" in names
    assert not any(n.startswith("qalora/kernels/") for n in names)
    bench = {p.as_posix() for p in _import_closure(("qalora_pipeline.tasks.benchmark",))}
    assert any(p.endswith("qalora/kernels/lowbit_cuda.cu") for p in bench)
    assert code_version("qalora_pipeline.tasks.tune") != code_version("qalora_pipeline.tasks.benchmark") != code_version()


# --- output paths: a stage replaces only an earlier output of its own stage ------------------------

def _artifact(folder: Path, stage: str, payload: str = "old") -> Path:
    """A finished stage folder: a payload file and a manifest naming ``stage``."""
    folder.mkdir(parents=True)
    (folder / "payload.txt").write_text(payload)
    (folder / "manifest.json").write_text(f'{{"stage": "{stage}"}}')
    return folder


def _write(out: Path, stage: str, **kw) -> None:
    with atomic_output_dir(out, stage, **kw) as tmp:
        (tmp / "payload.txt").write_text("new")
        (tmp / "manifest.json").write_text(f'{{"stage": "{stage}"}}')


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


def test_new_path_and_empty_folder_are_written(tmp_path):
    _write(tmp_path / "a" / "new", "quantize")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "quantize")
    assert (tmp_path / "a" / "new" / "payload.txt").read_text() == "new"
    assert (tmp_path / "empty" / "payload.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_same_stage_output_is_replaced(tmp_path):
    out = _artifact(tmp_path / "q", "quantize")
    (out / "stale.bin").write_text("from the earlier run")
    _write(out, "quantize")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "payload.txt"]
    assert (out / "payload.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_existing_file_is_refused_untouched(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"user weights")
    with pytest.raises(FileExistsError, match=r"model\.gguf: it is a file.*Valid: a path that does not exist"):
        _write(out, "quantize")
    assert out.read_bytes() == b"user weights" and _leftovers(tmp_path) == []


def test_user_folder_is_refused_untouched(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"runs: it is a folder holding notes\.txt \(no manifest\.json"):
        _write(out, "tune")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_other_stage_output_is_refused(tmp_path):
    out = _artifact(tmp_path / "base", "quantize")
    with pytest.raises(FileExistsError, match=r"'merge' output to .*base: it is the output of stage 'quantize'.*"
                                              r"or an earlier 'merge' output to replace"):
        _write(out, "merge")
    assert (out / "payload.txt").read_text() == "old"


def test_unreadable_manifest_is_not_an_artifact(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "manifest.json").write_text("not json")
    with pytest.raises(FileExistsError, match="a folder holding manifest.json"):
        _write(out, "quantize")


def test_overwrite_off_refuses_even_own_output(tmp_path):
    out = _artifact(tmp_path / "q", "quantize")
    with pytest.raises(FileExistsError, match="overwrite is off"):
        _write(out, "quantize", overwrite=False)
    assert (out / "payload.txt").read_text() == "old"


def test_symlink_is_refused(tmp_path):
    target = _artifact(tmp_path / "real", "quantize")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="it is a symlink to"):
        _write(link, "quantize")
    assert link.is_symlink() and (target / "payload.txt").read_text() == "old"


def test_marker_identifies_manifestless_stages(tmp_path):
    out = tmp_path / "step-000010"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    with atomic_output_dir(out, "tune-checkpoint", marker="trainer_state.json") as tmp:
        (tmp / "trainer_state.json").write_text('{"step": 10}')
    assert (out / "trainer_state.json").read_text() == '{"step": 10}'
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"no SOURCES\.json of a 'data' output"):
        check_output_path(tmp_path / "data", "data", marker="SOURCES.json")


def test_refusal_comes_before_the_work(tmp_path):
    (tmp_path / "f").write_text("x")
    ran = []
    with pytest.raises(FileExistsError):
        with atomic_output_dir(tmp_path / "f", "quantize"):
            ran.append(True)
    assert not ran


def test_path_filled_during_the_work_is_refused_at_rename(tmp_path):
    out = tmp_path / "q"
    with pytest.raises(FileExistsError, match="notes.txt"):
        with atomic_output_dir(out, "quantize") as tmp:
            (tmp / "manifest.json").write_text('{"stage": "quantize"}')
            out.mkdir()
            (out / "notes.txt").write_text("written meanwhile")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and _leftovers(tmp_path) == []


def test_check_output_path_says_whether_it_replaces(tmp_path):
    assert check_output_path(tmp_path / "none", "quantize") is False
    assert check_output_path(_artifact(tmp_path / "q", "quantize"), "quantize") is True


# --- the CLI: --out never destroys -----------------------------------------------------------------

def _quantize(fp: Path, out: Path, bits: int = 4) -> int:
    from qalora_pipeline.cli import main

    return main(["quantize", "--model", str(fp), "--method", "rtn", "--bits", str(bits), "--group-size", "32",
                 "--out", str(out), "--no-progress"])


def _one_line_refusal(capsys, out: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert err.startswith("qalora ") and "refusing to write" in err and str(out) in err
    return err


def test_cli_refuses_existing_file(tmp_path, fp_model_dir, capsys):
    out = tmp_path / "weights.bin"
    out.write_bytes(b"precious")
    assert _quantize(fp_model_dir, out) == 2
    assert "it is a file" in _one_line_refusal(capsys, out)
    assert out.read_bytes() == b"precious" and _leftovers(tmp_path) == []


def test_cli_refuses_user_folder(tmp_path, fp_model_dir, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _quantize(fp_model_dir, out) == 2
    assert "notes.txt" in _one_line_refusal(capsys, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_cli_replaces_own_output_and_refuses_another_stages(tmp_path, fp_model_dir, capsys):
    import json

    from conftest import write_alpaca
    from qalora_pipeline.cli import main

    q = tmp_path / "q"
    assert _quantize(fp_model_dir, q, bits=4) == 0
    assert _quantize(fp_model_dir, q, bits=3) == 0  # re-running the stage onto its own output replaces it
    assert json.loads((q / "qalora_quant.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 3
    capsys.readouterr()
    # tune --out onto the base (another stage's output): refused before any training step
    assert main(["tune", "--base", str(q), "--data", str(write_alpaca(tmp_path / "a.json")), "--out", str(q),
                 "--steps", "1", "--no-progress"]) == 2
    assert "output of stage 'quantize'" in _one_line_refusal(capsys, q)
    assert not (tmp_path / "q.checkpoints").exists()
    # quantize --out onto a tune output: refused, the adapter untouched
    assert main(["tune", "--base", str(q), "--data", str(tmp_path / "a.json"), "--out", str(tmp_path / "ad"),
                 "--steps", "1", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    capsys.readouterr()
    assert _quantize(fp_model_dir, tmp_path / "ad") == 2
    assert "output of stage 'tune'" in _one_line_refusal(capsys, tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    # merge --out onto its base: refused, the base still loads
    assert main(["merge", "--base", str(q), "--adapter", str(tmp_path / "ad"), "--out", str(q)]) == 2
    assert "output of stage 'quantize'" in _one_line_refusal(capsys, q)
    assert json.loads((q / "manifest.json").read_text())["stage"] == "quantize"


def test_a_dead_writers_leftovers_are_swept_a_live_ones_kept(tmp_path):
    import subprocess

    from qalora.manifest import _writer_tag

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (a reuse within this test is vanishingly unlikely)
    host_prefix = _writer_tag(out).rsplit(".", 2)[0]  # ".out.<host>"
    stale = [tmp_path / f"{host_prefix}.{dead_pid}.x1.partial", tmp_path / f"{host_prefix}.{dead_pid}.x2.old"]
    live = tmp_path / f"{host_prefix}.{os.getppid()}.x3.partial"  # the parent process: alive
    other_host = tmp_path / f".out.elsewhere.{dead_pid}.x4.partial"
    for p in (*stale, live, other_host):
        p.mkdir()
        (p / "half.bin").write_bytes(b"x")
    _write(out, "quantize")
    assert _leftovers(tmp_path) == sorted([live.name, other_host.name])
