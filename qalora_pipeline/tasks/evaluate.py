"""Prefect task: lm-eval tasks + held-out perplexity on the merged low-bit model."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.device import device_identity, resolve_device
from qalora.evaluate import evaluate_to_folder
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(p: Params, model: StageResult, eval_dir: Path, heldout: Path, data_md5: str,
                  variant: str = "merged") -> StageResult:
    """Evaluate ``model``: the merged model, or a baseline (``variant`` fp: the source model, base: the
    untuned quantized base) on the same questions; cached by the model's key, so a baseline is scored once."""
    device = device_identity(resolve_device(p.evaluate.device, key="evaluate.device"))  # bf16 on a GPU, fp32 on CPU
    material = {"params": p.evaluate.model_dump(exclude={"baselines"}), "model": model.key, "variant": variant,
                "data": data_md5, "device": device}
    return run_cached("evaluate", "eval" if variant == "merged" else f"eval-{variant}", material,
                      lambda out: evaluate_to_folder(model.dir, out, p.evaluate, eval_dir, heldout,
                                                     trust_remote_code=p.model.trust_remote_code),
                      code_module=__name__)
