"""Prefect task: the quantize stage (cached by model, calibration, params and code)."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.device import device_identity, resolve_device
from qalora.manifest import sha256_file
from qalora.quantize import quantize_to_folder
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="quantize", cache_policy=NONE)
def quantize_task(p: Params, calibration: Path, source: StageResult) -> StageResult:
    """``source``: the fp model (path and content hash, from the flow: hashed once per run)."""
    gptq = p.quantize.method == "gptq"
    material = {"params": p.quantize.model_dump(), "model": source.key,
                "calibration": sha256_file(calibration) if gptq else None,
                # GPTQ on a GPU gives other bits than on a CPU: where it runs is part of the key
                "device": device_identity(resolve_device(p.quantize.device, key="quantize.device")) if gptq else None}
    return run_cached("quantize", p.quantize.tag, material, lambda out: quantize_to_folder(
        source.dir, out, p.quantize, calibration if gptq else None, trust_remote_code=p.model.trust_remote_code),
                      code_module=__name__)
