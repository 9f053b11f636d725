"""Prefect task: the bit-exactness check; its report is an input of the gate, so failing is no error."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.check import check_merge
from qalora.config import Params
from qalora.manifest import atomic_output_dir, write_json_atomic, write_manifest
from tasks.stage_cache import StageResult, run_cached

REPORT = "check.json"


def _write(out: Path, p: Params, base: StageResult, adapter: StageResult, merged: StageResult) -> None:
    report = check_merge(base.dir, adapter.dir, merged.dir, p.check)
    with atomic_output_dir(out, "check") as tmp:
        write_json_atomic(tmp / REPORT, report)
        logits = report["checks"]["logits"]
        write_manifest(tmp, "check", p.check.model_dump(),
                       inputs={"base": base.key, "adapter": adapter.key, "merged": merged.key},
                       # the gate's figure names (check.passed, check.logits.max_rel_error, ...)
                       extra={"metrics": {"passed": float(report["passed"]),
                                          "logits.max_rel_error": logits["max_rel_error"],
                                          "logits.max_abs_error": logits["max_abs_error"],
                                          "logits.greedy_identical_prompts": float(logits["greedy_identical_prompts"])}})


@task(name="check", cache_policy=NONE)
def check_task(p: Params, base: StageResult, adapter: StageResult, merged: StageResult) -> StageResult:
    material = {"params": p.check.model_dump(), "base": base.key, "adapter": adapter.key, "merged": merged.key}
    return run_cached("check", "check", material, lambda out: _write(out, p, base, adapter, merged),
                      code_module=__name__)
