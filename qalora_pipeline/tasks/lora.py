"""Prefect tasks: plain LoRA on the fp source (over its own or its NF4 weights) and its merge into a
full-precision folder: the accuracy sweep's reference methods (qalora.lora)."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from qalora.config import Params
from qalora.lora import Base, merge_lora, tune_lora
from qalora.manifest import sha256_file
from qalora_pipeline.tasks.stage_cache import StageResult, run_cached


@task(name="lora-tune", cache_policy=NONE)
def lora_tune_task(p: Params, source: StageResult, train: Path, base: Base) -> StageResult:
    material = {"params": p.tune.model_dump(), "source": source.key, "base": base, "data": sha256_file(train)}
    return run_cached("lora-tune", f"{base}.r{p.tune.rank}.s{p.tune.steps}", material,
                      lambda out: tune_lora(source.dir, train, out, p.tune, base,
                                            trust_remote_code=p.model.trust_remote_code),
                      code_module=__name__)


@task(name="lora-merge", cache_policy=NONE)
def lora_merge_task(p: Params, source: StageResult, adapter: StageResult) -> StageResult:
    material = {"source": source.key, "adapter": adapter.key}
    return run_cached("lora-merge", "merged-fp", material,
                      lambda out: merge_lora(source.dir, adapter.dir, out, trust_remote_code=p.model.trust_remote_code),
                      code_module=__name__)
