"""Prefect task: the bit-exactness check; its report is an input of the gate, so failing is no error."""

from prefect import task
from prefect.cache_policies import NONE

from qalora.check import check_to_folder
from qalora.config import Params
from qalora.device import device_identity, resolve_device
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="check", cache_policy=NONE)
def check_task(p: Params, base: StageResult, adapter: StageResult, merged: StageResult) -> StageResult:
    material = {"params": p.check.model_dump(), "base": base.key, "adapter": adapter.key, "merged": merged.key,
                "device": device_identity(resolve_device(p.check.device, key="check.device"))}
    return run_cached("check", "check", material,
                      lambda out: check_to_folder(base.dir, adapter.dir, merged.dir, out, p.check),
                      code_module=__name__)
