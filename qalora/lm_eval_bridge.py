"""What touches lm-eval's objects: the in-memory model wrapper, its log noise, and reading its results
into our JSON-able result (per task: metrics with stderr, n, split, shots; per group likewise)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def lm_class():
    from lm_eval.models.huggingface import HFLM

    class QaloraHFLM(HFLM):
        """HFLM over an in-memory model, with the progress bar switchable."""

        def __init__(self, *args, progress: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self._qalora_progress = progress

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self._qalora_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self._qalora_progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self._qalora_progress)

    return QaloraHFLM


class _DropNoise(logging.Filter):
    NOISE = ("Custom kwargs can be passed to `--metadata`",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


@contextlib.contextmanager
def quiet_lm_eval(progress: bool) -> Iterator[None]:
    """Drop lm-eval's per-task custom_dataset chatter and datasets' map bars; keep real warnings."""
    import datasets

    filt = _DropNoise()
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm_eval.api.task")]
    for lg in loggers:
        lg.addFilter(filt)
    bars_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)
        if bars_on:
            datasets.utils.logging.enable_progress_bar()


def _split_metric(key: str) -> tuple[str, str]:
    metric, _, filt = key.partition(",")
    return metric, filt


def _clean(value: Any) -> Any:
    """numpy scalars -> float, 'N/A' stderr (n = 1) -> None, NaN -> None."""
    if isinstance(value, str):
        return None if value == "N/A" else value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return None if math.isnan(f) else f


def _metrics_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, filt = _split_metric(key)
        out[metric if filt in ("none", "") else f"{metric}_{filt}"] = _clean(value)
    return out


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: _clean(o) if not isinstance(o, (set, tuple)) else list(o)))


def find_task(built, name: str):
    from lm_eval.api.group import Group

    for obj in built:
        if isinstance(obj, Group):
            for t in obj.get_all_tasks():
                if t.task_name == name:
                    return t
        elif obj.task_name == name:
            return obj
    raise KeyError(name)


def collect(result: dict[str, Any], raw: Mapping[str, Any], built) -> None:
    n_samples = raw.get("n-samples", {})
    n_shot = raw.get("n-shot", {})
    group_names = set(raw.get("groups", {})) | set(raw.get("group_subtasks", {}))
    for name, entry in raw["results"].items():
        if name in group_names:
            continue
        task = find_task(built, name)
        cfg = task.config
        split = cfg.test_split or cfg.validation_split
        ns = n_samples.get(name, {})
        result["tasks"][name] = {
            "alias": str(entry.get("alias", name)).strip(" -"),
            **_metrics_of(entry),
            "n": int(ns.get("effective", 0)), "n_total": int(ns.get("original", 0)),
            "num_fewshot": int(n_shot.get(name, cfg.num_fewshot or 0)), "split": split,
        }
    for name, entry in raw.get("groups", {}).items():
        leaves = group_leaves(name, raw.get("group_subtasks", {}))
        result["groups"][name] = {
            "alias": str(entry.get("alias", name)).strip(" -"), **_metrics_of(entry),
            "n": sum(result["tasks"][t]["n"] for t in leaves if t in result["tasks"]),
            "n_total": sum(result["tasks"][t]["n_total"] for t in leaves if t in result["tasks"]),
            "num_fewshot": sorted({result["tasks"][t]["num_fewshot"] for t in leaves if t in result["tasks"]}),
            "subtasks": len(leaves),
        }
    result["group_subtasks"] = {k: list(v) for k, v in raw.get("group_subtasks", {}).items()}
    result["versions"] = dict(raw.get("versions", {}))


def group_leaves(name: str, subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    out = []
    for child in subtasks.get(name, []):
        out.extend(group_leaves(child, subtasks) if child in subtasks else [child])
    return out
