"""Code versions: a stage's cache key changes with the code it can run, and only with that."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import qalora
from qalora.manifest import _import_closure, code_version


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
    names = {p.relative_to(repo).as_posix() for p in _import_closure(("tasks.tune",))}
    assert "qalora/tune.py" in names and "tasks/stage_cache.py" in names
    assert not any(n.startswith("qalora/kernels/") for n in names)
    bench = {p.as_posix() for p in _import_closure(("tasks.benchmark",))}
    assert any(p.endswith("qalora/kernels/lowbit_cuda.cu") for p in bench)
    assert code_version("tasks.tune") != code_version("tasks.benchmark") != code_version()
