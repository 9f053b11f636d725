"""Prefect task: the QA-LoRA tune stage; an interrupted tune resumes from its checkpoints."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.manifest import sha256_file
from qalora.tune import tune
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="tune", cache_policy=NONE)
def tune_task(p: Params, base: StageResult, train: Path) -> StageResult:
    material = {"params": p.tune.model_dump(), "base": base.key, "data": sha256_file(train)}
    tag = f"r{p.tune.rank}.s{p.tune.steps}"
    return run_cached("tune", tag, material, lambda out: tune(base.dir, train, out, p.tune),
                      code_module=__name__)
