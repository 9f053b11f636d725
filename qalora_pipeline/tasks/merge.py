"""Prefect task: fold the adapter into the quantized zeros."""

from prefect import task
from prefect.cache_policies import NONE

from qalora.merge import merge
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="merge", cache_policy=NONE)
def merge_task(base: StageResult, adapter: StageResult) -> StageResult:
    material = {"base": base.key, "adapter": adapter.key}
    return run_cached("merge", "merged", material, lambda out: merge(base.dir, adapter.dir, out),
                      code_module=__name__)
