"""Prefect task: decode/prefill speed of the merged low-bit model vs the same weights dense, one run."""

from prefect import task
from prefect.cache_policies import NONE

from qalora.bench import benchmark_to_folder
from qalora.config import Params
from qalora.device import device_identity, resolve_device
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="benchmark", cache_policy=NONE)
def benchmark_task(p: Params, merged: StageResult) -> StageResult:
    device = resolve_device(p.benchmark.device, key="benchmark.device")
    material = {"params": p.benchmark.model_dump(), "merged": merged.key, "device": device_identity(device)}
    return run_cached("benchmark", device, material,
                      lambda out: benchmark_to_folder(merged.dir, out, p.benchmark, device),
                      code_module=__name__)
