"""Prefect task: lm-eval tasks + held-out perplexity on the merged low-bit model."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.evaluate import evaluate_path
from qalora.manifest import atomic_output_dir, write_manifest
from tasks.stage_cache import StageResult, run_cached

RESULT = "eval.json"


def _write(out: Path, p: Params, merged: StageResult, eval_dir: Path, heldout: Path) -> None:
    e = p.evaluate
    tasks = list(e.tasks) + (["wiki_ppl"] if e.perplexity else [])
    with atomic_output_dir(out, "evaluate") as tmp:
        result = evaluate_path(merged.dir, tasks, json_out=tmp / RESULT, data_dir=eval_dir, ppl_text=heldout,
                               num_fewshot=e.num_fewshot, limit=e.limits(), batch_size=e.batch_size,
                               ppl_context=e.perplexity_context, ppl_max_tokens=e.perplexity_max_tokens)
        write_manifest(tmp, "evaluate", e.model_dump(), inputs={"merged": merged.key},
                       extra={"metrics": result["metrics"]})


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(p: Params, merged: StageResult, eval_dir: Path, heldout: Path, data_md5: str) -> StageResult:
    material = {"params": p.evaluate.model_dump(), "merged": merged.key, "data": data_md5}
    return run_cached("evaluate", "eval", material, lambda out: _write(out, p, merged, eval_dir, heldout),
                      code_module=__name__)
