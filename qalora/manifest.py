"""Stage folders: atomic creation and ``manifest.json`` (inputs, params, versions, output hashes).

Every stage writes into a temporary sibling folder and renames it into place only when complete,
so a crash never leaves a folder that a later stage could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from qalora import numerics
from qalora.crash import crash_point

MANIFEST = "manifest.json"
_PACKAGES = ("qalora", "torch", "transformers", "safetensors", "gptqmodel", "gguf", "numpy")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """Hash of dtype, shape and raw bytes, so equal hashes mean bit-identical tensors."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_state(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit sha and dirty flag of the code that ran (None outside a git checkout)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def _existing_output(out: Path, stage: str, marker: str) -> tuple[bool, str]:
    """What is at the existing path ``out``: (whether it is an earlier output of ``stage``, a phrase
    saying what is there, for error messages)."""
    if out.is_symlink():
        return False, f"a symlink to {os.readlink(out)}"
    if not out.is_dir():
        return False, "a file" if out.is_file() else "neither a file nor a folder"
    entries = sorted(p.name for p in out.iterdir())
    if marker != MANIFEST and (out / marker).is_file():
        return True, f"an earlier {stage!r} output (it holds {marker})"
    if marker == MANIFEST and (out / MANIFEST).is_file():
        try:
            found = json.loads((out / MANIFEST).read_text()).get("stage")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            found = None
        if isinstance(found, str):
            return found == stage, f"the output of stage {found!r} (its {MANIFEST} says \"stage\": {found!r})"
    listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return False, f"a folder holding {listed or 'nothing'} (no {marker} of a {stage!r} output)"


def check_output_path(out: str | os.PathLike, stage: str, *, marker: str = MANIFEST,
                      overwrite: bool = True) -> bool:
    """Refuse to write stage ``stage`` at ``out`` where that would destroy anything it does not own.

    ``out`` is a valid output when it does not exist, is an empty folder (nothing to lose), or,
    with ``overwrite``, holds a complete earlier output of the same stage: a folder whose
    ``manifest.json`` says ``"stage": stage`` or, for the stages that write no manifest (data,
    report, tune checkpoints), a folder holding their ``marker`` file. Re-running a stage onto its
    own output replaces it, which the content-addressed stage cache and re-run commands rely on; a
    user's file or folder, or another stage's output, is never replaced. Stage folders are renamed
    into place only when complete, so a folder with the stage's manifest is a complete output.

    Returns whether ``out`` exists (and so will be replaced). Raises FileExistsError naming ``out``,
    what is there and what would be valid.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return True
    own, what = _existing_output(out, stage, marker)
    if own and overwrite:
        return True
    valid = "a path that does not exist or an empty folder" + (
        f", or an earlier {stage!r} output to replace" if overwrite
        else f" (overwrite is off: not even an earlier {stage!r} output)")
    raise FileExistsError(f"refusing to write the {stage!r} output to {out}: it is {what}, "
                          f"which would be destroyed. Valid: {valid}")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, stage: str, *, marker: str = MANIFEST,
                      overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out`` in one rename.

    ``stage`` names the stage writing ``out`` (its manifest's ``"stage"``); what may be replaced is
    decided by :func:`check_output_path`, before the work (fail fast) and again just before the
    rename (the path may have been filled meanwhile). ``marker``: see there.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(out, stage, marker=marker, overwrite=overwrite)
    _sweep_dead_writers(out)
    owner = _writer_tag(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=owner, suffix=".partial"))
    try:
        yield tmp
        crash_point(f"{stage}.commit")
        if check_output_path(out, stage, marker=marker, overwrite=overwrite):
            # A fresh empty name, so a leftover from a crashed run (same pid in a container) cannot block.
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=owner, suffix=".old"))
            os.replace(out, old)  # a folder may replace an empty folder
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_failure(e):  # disk full, file size limit, ...: say which artifact, and that nothing was left
            raise OSError(f"writing {out} failed ({' '.join(str(e).split())}); nothing was written there, "
                          f"free space and run again") from e
        raise


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # dots would break the name's fields


def _writer_tag(out: Path) -> str:
    """Prefix of this process's temporary siblings of ``out``: ``.<name>.<host>.<pid>.``, so a later
    writer can tell a crashed writer's leftovers from a live one's."""
    return f".{out.name}.{_host()}.{os.getpid()}."


def _sweep_dead_writers(out: Path) -> None:
    """Remove the ``.partial``/``.old`` siblings of ``out`` left by a writer on this host that is no
    longer alive (killed mid-write). A live writer's, another host's or an unparseable name is kept."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        fields = p.name[len(out.name) + 2:].split(".")
        if (p.suffix in (".partial", ".old") and len(fields) >= 3 and fields[0] == _host()
                and fields[1].isdigit() and not pid_alive(int(fields[1]))):
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (someone else's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_io_failure(e: BaseException) -> bool:
    """An OS write error, or safetensors' wrapping of one ("I/O error: ...")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO):
        return True
    return type(e).__name__ == "SafetensorError" and "I/O error" in str(e)


def write_manifest(
    folder: str | os.PathLike,
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json``; ``outputs`` defaults to sha256 of every file in the folder."""
    folder = Path(folder)
    if outputs is None:
        outputs = {
            str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
    manifest = {
        "stage": stage,
        "created_unix": int(time.time()),
        "params": dict(params),
        "inputs": dict(inputs),
        "outputs": dict(outputs),
        "code": git_state(),
        "versions": package_versions(),
        "numerics": numerics.describe(),
        **(dict(extra) if extra else {}),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def code_version(*entry_modules: str) -> str:
    """sha256 over source files: the code part of stage cache keys and of run lineage.

    With no argument: every source and data file of the qalora package (run lineage). With entry
    modules (``"tasks.tune"``): only the files those modules can execute, i.e. the closure of their
    imports inside qalora and the entries' own top-level packages, plus the package data (yaml, json,
    CUDA sources) of every package in it. So editing the kernels re-runs the benchmark stage but not the tune.
    """
    if not entry_modules:
        root = Path(__file__).resolve().parent
        files = [p for p in sorted(root.rglob("*")) if _is_source(p)]
        return _hash_files(files, root.parent)
    files = sorted(_import_closure(entry_modules))
    return _hash_files(files, Path(os.path.commonpath([str(f.parent) for f in files])))


def _is_source(path: Path) -> bool:
    """Any file shipped in the package (code, kernels, prompt templates), not bytecode."""
    return path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so")


def _hash_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _module_file(name: str) -> Path | None:
    """The file that defines module ``name`` (``pkg/mod.py`` or ``pkg/__init__.py``), found without
    importing anything below the top-level package."""
    import importlib.util

    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _package_data(package: Path) -> set[Path]:
    """Non-Python files of ``package``: in its folder and in subfolders that are not packages."""
    def own(path: Path) -> bool:
        between = path.relative_to(package).parents
        return not any((package / d / "__init__.py").is_file() for d in between if d != Path("."))

    return {p.resolve() for p in package.rglob("*") if _is_source(p) and p.suffix != ".py" and own(p)}


def _import_closure(entry_modules: tuple[str, ...]) -> set[Path]:
    """Files of ``entry_modules`` and of every module they import (at any depth, lazily or not)
    inside qalora and the entry modules' top-level packages, their parent ``__init__``s, and package data."""
    import ast

    tops = {"qalora"} | {m.split(".")[0] for m in entry_modules}
    todo, seen, files = list(entry_modules), set(), set()
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in tops:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        files.add(path)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parents' __init__ run too
        if path.name == "__init__.py":
            files.update(_package_data(path.parent))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)  # may be submodules
    return files
