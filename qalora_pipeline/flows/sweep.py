"""The accuracy sweep: QA-LoRA against QLoRA -> GPTQ, GPTQ alone and LoRA on the fp model, at each bit
width and group size of ``sweep`` (qalora.config.SweepParams), as one Prefect flow.

Every variant is a chain of the pipeline's content-cached stages (plus plain LoRA's, tasks/lora.py), so
variants share what they have in common (one GPTQ base per bits x group serves GPTQ alone and QA-LoRA; one
NF4 LoRA serves QLoRA -> GPTQ at every setting; the fp model and LoRA on it are scored once) and an
interrupted sweep resumes where it stopped. Variants run one after another: each stage already uses every
core. Each finished variant is logged as its own MLflow run (tracking/sweep.py) and the report
(``sweep.report``) is rebuilt from those runs after every variant, so it always shows what is done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from qalora import numerics

numerics.pin()  # before torch runs (see flows/pipeline.py)

from prefect import flow  # noqa: E402

from qalora.config import Params, load_params  # noqa: E402
from qalora.evaluate import RESULT as EVAL_RESULT  # noqa: E402
from qalora.manifest import git_state, read_json  # noqa: E402
from qalora.paths import resolve_path  # noqa: E402
from qalora.report.accuracy import write_accuracy_report  # noqa: E402
from qalora_pipeline import data_version  # noqa: E402
from qalora_pipeline.flows.pipeline import source_stage, state_lock  # noqa: E402
from qalora_pipeline.tasks.evaluate import evaluate_task  # noqa: E402
from qalora_pipeline.tasks.lora import lora_merge_task, lora_tune_task  # noqa: E402
from qalora_pipeline.tasks.merge import merge_task  # noqa: E402
from qalora_pipeline.tasks.quantize import quantize_task  # noqa: E402
from qalora_pipeline.tasks.stage_cache import StageResult  # noqa: E402
from qalora_pipeline.tasks.tune import tune_task  # noqa: E402
from qalora_pipeline.tracking.sweep import log_variant, variant_records  # noqa: E402


def variants(p: Params) -> list[dict[str, Any]]:
    """The sweep's variants in run order: the fp model, then per group size and bit width each method
    (LoRA on fp once, at the first setting)."""
    out: list[dict[str, Any]] = [{"method": "fp", "bits": None, "group_size": None}]
    for group in p.sweep.group_sizes:
        for bits in p.sweep.bits:
            for method in p.sweep.methods:
                if method == "lora_fp":
                    if not any(v["method"] == "lora_fp" for v in out):
                        out.append({"method": "lora_fp", "bits": None, "group_size": None})
                else:
                    out.append({"method": method, "bits": bits, "group_size": group})
    return out


def report_settings(p: Params) -> dict[str, Any]:
    """What the report states about how every variant was made."""
    t, q, e = p.tune, p.quantize, p.evaluate
    git = git_state()
    return {"code": f"git {str(git['sha'])[:12]}{' (uncommitted changes)' if git['dirty'] else ''}",
            "model": p.model.source, "train": p.data.train,
            "tuning": f"{t.steps} steps x {t.micro_batch_size * t.grad_accum} sequences of <= {t.max_seq_len} "
                      f"tokens, lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup), rank {t.rank}, alpha "
                      f"{t.alpha:g}, dropout {t.dropout:g}, seed {t.seed}, {','.join(t.targets)}",
            "quantization": f"{q.method.upper()} {'symmetric' if q.sym else 'asymmetric'}"
                            + (f", {q.calib_samples} x {q.calib_seq_len} calibration tokens from {p.data.calibration}"
                               if q.method == "gptq" else "")
                            + "; QLoRA base: bitsandbytes NF4, blocks of 64, double quant",
            "evaluation": f"lm-eval, limit {e.limit} per task, {e.limit_per_task} (MMLU: per subject), "
                          f"num_fewshot {e.num_fewshot} (null: MMLU 5, others 0); perplexity on the first "
                          f"{e.perplexity_max_tokens} tokens of {p.data.heldout}"}


class _Sweep:
    """One sweep's stage results, built on demand and shared between the variants that need them."""

    def __init__(self, p: Params, root: Path, data_md5: str) -> None:
        self.p, self.data_md5 = p, data_md5
        self.paths = {k: resolve_path(getattr(p.data, k), root) for k in ("train", "calibration", "heldout", "eval_dir")}
        self.source = source_stage(p)
        self._memo: dict[tuple, StageResult] = {}

    def _once(self, key: tuple, make) -> StageResult:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def at(self, bits: int, group: int) -> Params:
        return self.p.model_copy(update={"quantize": self.p.quantize.model_copy(update={"bits": bits, "group_size": group})})

    def lora(self, base: str) -> tuple[StageResult, StageResult]:
        adapter = self._once(("lora-tune", base), lambda: lora_tune_task(self.p, self.source, self.paths["train"], base))
        merged = self._once(("lora-merge", base), lambda: lora_merge_task(self.p, self.source, adapter))
        return adapter, merged

    def gptq(self, q: Params, source: StageResult) -> StageResult:
        return self._once(("quantize", q.quantize.tag, source.key),
                          lambda: quantize_task(q, self.paths["calibration"], source))

    def evaluate(self, q: Params, model: StageResult, variant: str) -> StageResult:
        return evaluate_task(q, model, self.paths["eval_dir"], self.paths["heldout"], self.data_md5, variant)

    def run(self, v: dict[str, Any]) -> tuple[StageResult, dict[str, float]]:
        """The evaluation of variant ``v`` and its cost figures (learnable parameters, seconds)."""
        method = v["method"]
        q = self.at(v["bits"], v["group_size"]) if v["bits"] is not None else self.p
        if method == "fp":
            return self.evaluate(q, self.source, "fp"), {}
        if method == "lora_fp":
            adapter, merged = self.lora("fp")
            return self.evaluate(q, merged, "lora_fp"), _tuned(adapter)
        if method == "qlora_gptq":
            adapter, merged = self.lora("nf4")
            base = self.gptq(q, merged)
            return self.evaluate(q, base, "qlora_gptq"), _tuned(adapter) | _quantized(base)
        base = self.gptq(q, self.source)
        if method == "gptq":
            return self.evaluate(q, base, "base"), _quantized(base)
        adapter = tune_task(q, base, self.paths["train"])
        merged = merge_task(base, adapter)
        return self.evaluate(q, merged, "merged"), _tuned(adapter) | _quantized(base)


def _tuned(adapter: StageResult) -> dict[str, float]:
    return {"trainable_params": adapter.metrics["trainable_params"], "tune_seconds": adapter.metrics["train_seconds"],
            "final_loss": adapter.metrics["final_loss"]}


def _quantized(base: StageResult) -> dict[str, float]:
    return {"quantize_seconds": base.metrics.get("quantize_seconds", 0.0)}


def write_sweep_report(p: Params, report: Path, todo: list[dict[str, Any]] | None = None) -> Path:
    """The report from the sweep's MLflow runs (those of ``todo``'s variants, default: the params' sweep)."""
    wanted = {(v["method"], v["bits"], v["group_size"]) for v in (todo or variants(p))}
    records = [r for r in variant_records(p.tracking, p.sweep.experiment, p.name)
               if (r["method"], r["bits"], r["group_size"]) in wanted]
    return write_accuracy_report(report, records)


@flow(name="qalora-sweep", log_prints=True)
def qalora_sweep(params_file: str | None = "params/accuracy.yaml", overrides: list[str] | None = None,
                 project_dir: str = ".") -> dict[str, Any]:
    """Run every variant of the sweep (cached stages reused), log each to MLflow, write the report."""
    numerics.activate()
    p = load_params(params_file, overrides)
    root = Path(project_dir).resolve()
    data_md5 = data_version.verify(root)
    report = resolve_path(p.sweep.report, root)
    todo = variants(p)
    logged = []
    with state_lock():
        sweep = _Sweep(p, root, data_md5)
        for i, v in enumerate(todo, 1):
            t0 = time.perf_counter()
            evaluation, cost = sweep.run(v)
            result = read_json(Path(evaluation.dir) / EVAL_RESULT, "eval result")
            params = {"method": v["method"], "bits": v["bits"], "group_size": v["group_size"],
                      "eval_dir": evaluation.dir, **{f"setting.{k}": s for k, s in report_settings(p).items()}}
            _, new = log_variant(p.tracking, p.sweep.experiment, p.name, v, evaluation.key, evaluation.metrics | cost,
                                 result.get("answers"), params)
            logged += [v] if new else []
            name = v["method"] if v["bits"] is None else f"{v['method']} int{v['bits']}.g{v['group_size']}"
            # stderr, not print: the flow's prints go to Prefect's logger, shown only from WARNING up
            sys.stderr.write(f"sweep {i}/{len(todo)}: {name} {'cached' if evaluation.cached else 'evaluated'} "
                             f"in {time.perf_counter() - t0:.0f} s\n")
            write_sweep_report(p, report, todo)
    return {"variants": len(todo), "newly_logged": len(logged), "report": str(report)}
