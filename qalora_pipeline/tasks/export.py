"""Prefect task: export the merged model to one format (GGUF, HQQ), its error measured on the check prompts."""

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.export import export_model
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="export", cache_policy=NONE)
def export_task(p: Params, merged: StageResult, fmt: str) -> StageResult:
    material = {"format": fmt, "max_new_tokens": p.export.max_new_tokens, "prompts": p.check.prompts,
                "merged": merged.key}
    return run_cached("export", fmt, material,
                      lambda out: export_model(merged.dir, fmt, out, prompts=p.check.prompts,
                                               max_new_tokens=p.export.max_new_tokens),
                      code_module=__name__)
