"""Prefect task: lm-eval tasks + held-out perplexity on the merged low-bit model."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.evaluate import evaluate_to_folder
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(p: Params, merged: StageResult, eval_dir: Path, heldout: Path, data_md5: str) -> StageResult:
    material = {"params": p.evaluate.model_dump(), "merged": merged.key, "data": data_md5}
    return run_cached("evaluate", "eval", material,
                      lambda out: evaluate_to_folder(merged.dir, out, p.evaluate, eval_dir, heldout),
                      code_module=__name__)
