"""Prefect task: decode/prefill speed of the merged low-bit model vs the same weights dense, one run."""

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NONE

from qalora.bench import benchmark_stage
from qalora.config import Params
from qalora.manifest import atomic_output_dir, read_json, write_json_atomic, write_manifest
from tasks.stage_cache import StageResult, run_cached

RESULT = "bench.json"


def bench_figures(result: dict[str, Any]) -> dict[str, float]:
    """Flat figures: decode_tok_s.{lowbit,fp}.b{B}, decode_speedup.b{B}, prefill_ms.{lowbit,fp}.t{T}."""
    figures: dict[str, float] = {}
    for mode, label in (("lowbit", "lowbit"), ("dense", "fp")):
        for b, r in (result.get(mode) or {}).get("decode", {}).items():
            figures[f"decode_tok_s.{label}.b{b}"] = r["tokens_per_s"]
        for t, ms in (result.get(mode) or {}).get("prefill_ms", {}).items():
            figures[f"prefill_ms.{label}.t{t}"] = ms
    for b, ratio in (result.get("ratio_lowbit_over_dense") or {}).get("decode", {}).items():
        figures[f"decode_speedup.b{b}"] = ratio
    return figures


def latency_rows(res: StageResult) -> list[dict[str, float]]:
    result = read_json(Path(res.dir) / RESULT, "benchmark result")
    low, fp = result["lowbit"]["decode"], result["dense"]["decode"]
    return [{"batch": int(b), "lowbit_tok_s": low[b]["tokens_per_s"], "fp_tok_s": fp[b]["tokens_per_s"],
             "lowbit_ms_per_token": 1000 / low[b]["tokens_per_s"], "fp_ms_per_token": 1000 / fp[b]["tokens_per_s"]}
            for b in low if b in fp]


def _write(out: Path, p: Params, merged: StageResult, device: str) -> None:
    b = p.benchmark
    result = benchmark_stage(merged.dir, batches=b.batch_sizes, prefills=b.prefill_lengths, steps=b.decode_tokens,
                             device=device, dtype="fp16")
    with atomic_output_dir(out, "benchmark") as tmp:
        write_json_atomic(tmp / RESULT, result)
        write_manifest(tmp, "benchmark", b.model_dump(), inputs={"merged": merged.key},
                       extra={"metrics": bench_figures(result), "device": device})


@task(name="benchmark", cache_policy=NONE)
def benchmark_task(p: Params, merged: StageResult) -> StageResult:
    device = p.benchmark.device if p.benchmark.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    material = {"params": p.benchmark.model_dump(), "merged": merged.key, "device": name}
    return run_cached("benchmark", device, material, lambda out: _write(out, p, merged, device),
                      code_module=__name__)
