"""Which evaluation tasks a request names, and whether their local data is there.

Names are lm-eval's task, group and tag names from our YAMLs (:mod:`qalora.eval_tasks`), plus the
``wiki_ppl`` pseudo-task (perplexity of held-out text, :mod:`qalora.perplexity`) and shorthand
aliases. Protocol defaults follow the QA-LoRA paper: MMLU 5-shot, everything else 0-shot
(:data:`DEFAULT_FEWSHOT`). Every check here runs before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from qalora.eval_tasks import (
    COMMONSENSE,
    DATA_BUILD_COMMAND,
    DATA_DIR_KEY,
    TASK_DIR,
    MissingEvalData,
    default_data_dir,
    missing_data_message,
)

PPL_TASK = "wiki_ppl"
PPL_ALIASES = ("wiki_ppl", "wikitext_ppl")
# Shorthands expanded by expand_tasks().
TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "commonsense": COMMONSENSE,
    "paper": ("mmlu", *COMMONSENSE),
    "all": ("mmlu", *COMMONSENSE, PPL_TASK),
}
DEFAULT_TASKS: tuple[str, ...] = ("mmlu", *COMMONSENSE, PPL_TASK)
# Shots when the caller does not say: the paper's protocol, every MMLU task (the group, its subject
# groups, any subject) 5-shot, commonsense QA 0-shot.
DEFAULT_FEWSHOT: dict[str, int] = {"mmlu": 5}


def default_fewshot(task: str) -> int:
    return next((v for k, v in DEFAULT_FEWSHOT.items() if task == k or task.startswith(k + "_")), 0)


def task_manager(data_dir: str | Path | None = None):
    """An lm-eval TaskManager over our task YAMLs only (no built-in, hub-backed task can win)."""
    from lm_eval.tasks import TaskManager

    data_dir = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={DATA_DIR_KEY: str(data_dir)})


def available_tasks() -> list[str]:
    """Task, group and tag names ``evaluate`` accepts (plus the ``wiki_ppl`` pseudo-task and aliases)."""
    return sorted(set(_index_names()) | {PPL_TASK} | set(TASK_ALIASES))


def _index_names() -> list[str]:
    from lm_eval.tasks._index import TaskIndex

    return list(TaskIndex.build([TASK_DIR]))


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Comma-separated string or list -> ordered unique names, aliases expanded, unknown names refused."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (t.strip() for t in items):
        if not item:
            continue
        names = TASK_ALIASES.get(item, (item,))
        for name in names:
            name = PPL_TASK if name in PPL_ALIASES else name
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("no task given; e.g. --tasks mmlu,commonsense,wiki_ppl")
    known = set(_index_names())
    unknown = [n for n in out if n != PPL_TASK and n not in known]
    if unknown:
        leaves = sorted(n for n in known if not n.startswith("mmlu_"))
        raise ValueError(
            f"unknown task(s) {unknown}; qalora evaluates offline and knows: {leaves} "
            f"+ 57 mmlu_<subject> tasks, {PPL_TASK!r} and the aliases {sorted(TASK_ALIASES)}"
        )
    return out


def required_data(tasks: Sequence[str], data_dir: str | Path | None = None) -> dict[str, list[Path]]:
    """Local split folders each requested lm-eval task (or group/tag) reads, from the YAML index alone."""
    from lm_eval.tasks._index import Kind, TaskIndex

    data_dir = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    index = TaskIndex.build([TASK_DIR])

    def leaves(name: str) -> list[str]:
        entry = index[name]
        if entry.kind == Kind.TAG:
            return sorted(entry.tags)
        if entry.kind == Kind.GROUP:
            members = entry.cfg.get("task", [])
            return [leaf for m in (members if isinstance(members, list) else [members]) for leaf in leaves(m)]
        return [name]

    out: dict[str, list[Path]] = {}
    for name in tasks:
        if name == PPL_TASK:
            continue
        for leaf in leaves(name):
            kw = index[leaf].cfg.get("dataset_kwargs") or {}
            out[leaf] = [data_dir / kw["local_path"] / s for s in kw.get("splits", [])]
    return out


def check_data(tasks: Sequence[str], data_dir: str | Path | None = None, ppl_text: str | Path | None = None) -> None:
    """Raise :class:`MissingEvalData` (naming the path and ``qalora data build``) before any model is loaded."""
    data_root = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    for task, paths in required_data(tasks, data_root).items():
        for path in paths:
            if not path.is_dir():
                raise MissingEvalData(missing_data_message(path, data_root, f"data for task {task!r}"))
    if PPL_TASK in tasks:
        path = ppl_path(ppl_text)
        if not path.is_file():
            raise MissingEvalData(
                f"held-out text for {PPL_TASK} is missing: {path} does not exist. Build the data with "
                f"`{DATA_BUILD_COMMAND}` (the embedded default is unpacked by `make sources`), or pass --ppl-text FILE."
            )


def ppl_path(ppl_text: str | Path | None) -> Path:
    from qalora.paths import WIKI_DEMO, sources_dir

    return Path(ppl_text) if ppl_text is not None else sources_dir() / WIKI_DEMO


def per_task(value, chain: Sequence[str], default):
    """A per-task setting: a scalar, or a mapping searched along ``chain`` (task, its groups, requested name)."""
    if not isinstance(value, Mapping):
        return default if value is None else value
    for name in chain:
        if value.get(name) is not None:  # {task: None} means "no setting" (e.g. no limit)
            return value[name]
    return default
