"""The evaluation stage: MMLU, commonsense QA and perplexity through lm-eval, fully offline.

Tasks are lm-eval 0.4.13's own configs (prompts, choices, targets, metrics, MMLU's 57 subjects and
four subject groups) reading local ``save_to_disk`` folders (:mod:`qalora.eval_tasks`), so the
numbers are lm-eval's numbers computed without the hub. ``wiki_ppl`` is a pseudo-task next to them:
perplexity of held-out text (:mod:`qalora.perplexity`) with a stated context and stride.

Protocol defaults follow the QA-LoRA paper: MMLU 5-shot, everything else 0-shot. Splits: MMLU test
(few-shot from dev, lm-eval's ``first_n``); HellaSwag, PIQA, WinoGrande, BoolQ validation (as
lm-eval); ARC-e, ARC-c, OBQA validation (lm-eval uses test; the local data ships validation only).
Every task result states its split and sample count.

Python::

    model, tok, info = load_eval_model("runs/int4.g64")                     # qalora.eval_model
    result = evaluate(model, tok, ["mmlu", "arc_easy", "wiki_ppl"], limit=5)   # JSON-able dict

One module per concept: task names and data checks :mod:`qalora.eval_tasks.selection`, model
loading :mod:`qalora.eval_model`, lm-eval plumbing :mod:`qalora.lm_eval_bridge`; here the run, its
flat metrics, the text table and the stage folder (:func:`evaluate_to_folder`). ``qalora eval`` is
registered by the CLI (``qalora_pipeline.cli``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qalora.checkpoint import folder_input
from qalora.config import EvaluateParams
from qalora.device import resolve_device
from qalora.eval_model import is_lowbit_folder, load_eval_model
from qalora.eval_tasks import TASK_DIR, default_data_dir
from qalora.eval_tasks.selection import (
    DEFAULT_TASKS, PPL_TASK, check_data, default_fewshot, expand_tasks, per_task, ppl_path, task_manager,
)
from qalora.lm_eval_bridge import collect, find_task, group_leaves, jsonable, lm_class, quiet_lm_eval
from qalora.manifest import atomic_output_dir, sha256_file, write_json_atomic, write_manifest
from qalora.model_io import source_identity

RESULT = "eval.json"
# Defaults of the Python API and ``qalora eval``: the params schema's (evaluate.*), one owner.
_PARAMS = EvaluateParams()
DEFAULT_BATCH_SIZE = _PARAMS.batch_size
PPL_CONTEXT = _PARAMS.perplexity_context  # first 40k tokens, windows of 512: the reference figures
PPL_MAX_TOKENS = _PARAMS.perplexity_max_tokens


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
    ``settings``, ``model``, ``versions``, ``answers`` (per task: every question's correctness and
    doc hash, for the paired gate: :mod:`qalora.paired`).
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
        with quiet_lm_eval(progress):
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
                task = find_task(built, leaf)
                shots = per_task(num_fewshot, chain, default_fewshot(leaf))
                task.set_config(key="num_fewshot", value=int(shots))
                if isinstance(limit, Mapping) and (k := per_task(limit, chain, None)) is not None:
                    n = len(task.eval_docs)
                    k = int(math.ceil(n * k)) if isinstance(k, float) and k < 1.0 else int(k)
                    samples[leaf] = list(range(min(k, n)))
            lm_limit = None if isinstance(limit, Mapping) else limit
            lm = lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length, progress=progress)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            raw = simple_evaluate(
                model=lm, tasks=built, num_fewshot=None, limit=lm_limit, samples=samples or None,
                task_manager=tm, log_samples=True, random_seed=0, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        collect(result, raw, built)
        result["answers"] = answers(raw.get("samples") or {}, chains)
        questions = sum(t["n"] for t in result["tasks"].values())
        result["timing"].update(
            lm_eval_wall_s=wall, lm_eval_cpu_s=cpu, questions=questions,
            wall_s_per_1000_questions=1000 * wall / questions if questions else None,
            cpu_s_per_1000_questions=1000 * cpu / questions if questions else None,
            torch_threads=torch.get_num_threads(),
        )

    if PPL_TASK in names:
        from qalora.perplexity import perplexity

        path = ppl_path(ppl_text)
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
    return jsonable(result)



def answers(samples: Mapping[str, Sequence[Mapping[str, Any]]], chains: Mapping[str, Sequence[str]],
            metric: str = "acc") -> dict[str, Any]:
    """Per-question correctness from lm-eval's logged samples: ``{task: {"groups", "metric", "docs":
    {doc_id: [0|1, doc hash (16 hex)]}}}`` for every task that reports ``metric``; ``chains[task]`` is
    the task and its groups, innermost first. What :func:`qalora.paired.compare` pairs up."""
    out: dict[str, Any] = {}
    for task, rows in samples.items():
        docs = {str(r["doc_id"]): [int(float(r[metric]) > 0.5), str(r.get("doc_hash", ""))[:16]]
                for r in rows if metric in r}
        if docs:
            out[task] = {"groups": list(chains.get(task, [task])[1:]), "metric": metric, "docs": docs}
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
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, result)
    return result



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
    grouped = {t for g in result.get("groups", {}) for t in group_leaves(g, result.get("group_subtasks", {}))}
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


def evaluate_to_folder(model: str | Path, out: str | Path, params: EvaluateParams, data_dir: str | Path,
                       heldout: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """The evaluate stage: :func:`evaluate_path` on ``model`` (the merged model, or a baseline: a low-bit
    folder or a fp source) with the params' tasks (plus ``wiki_ppl`` on ``heldout`` when
    ``params.perplexity``), limits and shots; writes ``eval.json`` and the manifest (metrics: the result's
    flat ``task/metric`` figures) atomically to ``out``. Returns the manifest."""
    tasks = list(params.tasks) + ([PPL_TASK] if params.perplexity else [])
    with atomic_output_dir(out, "evaluate") as tmp:
        result = evaluate_path(model, tasks, json_out=tmp / RESULT, data_dir=data_dir, ppl_text=heldout,
                               trust_remote_code=trust_remote_code,
                               num_fewshot=params.num_fewshot, limit=params.limits(), batch_size=params.batch_size,
                               ppl_context=params.perplexity_context, ppl_max_tokens=params.perplexity_max_tokens,
                               device=resolve_device(params.device, key="evaluate.device"))
        source = (folder_input(model) if is_lowbit_folder(model)
                  else {"path": str(model), "sha256": source_identity(model)})
        return write_manifest(tmp, "evaluate", params.model_dump(), inputs={"model": source},
                              extra={"metrics": result["metrics"]})
