"""The GPTQModel child process: ``python -m qalora.quantizers.gptq.child JOB.json``.

Started by :func:`qalora.quantizers.gptq.runner.quantize_model_gptq`, never by hand. The child keeps
GPTQModel's import-time side effects (monkey patches of transformers/safetensors, env vars such as
HF_HOME set by its tokenizer helper, worker thread pools, and the global torch RNG that its first
quantize advances) out of the calling process. It reports progress as JSON lines in job['progress'].
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def _child_main(job_path: str) -> None:
    """Entry point of the child process: quantize job['src'] with GPTQModel into job['out']."""
    job = json.loads(Path(job_path).read_text())
    progress = open(job["progress"], "a", buffering=1)

    def event(**kw) -> None:
        progress.write(json.dumps({**kw, "t": round(time.time(), 3)}) + "\n")

    event(stage="import")
    from gptqmodel import GPTQModel, QuantizeConfig  # lazy: env was set by the parent

    calib = load_file(job["calibration"])
    samples = [{"input_ids": calib[k].tolist(), "attention_mask": [1] * calib[k].numel()} for k in sorted(calib)]
    dynamic = None
    if job["skip"]:
        import re

        dynamic = {"-:^(?:" + "|".join(re.escape(n) for n in job["skip"]) + ")$": {}}
    qcfg = QuantizeConfig(
        bits=job["bits"], group_size=job["group_size"], sym=job["sym"], desc_act=False,
        act_group_aware=job["act_group_aware"], true_sequential=True, damp_percent=job["damp_percent"],
        device=job.get("device", "cpu"), offload_to_disk_path=job["offload"], dynamic=dynamic,
    )
    event(stage="load")
    gm = GPTQModel.load(job["src"], qcfg, dtype=torch.float32)

    def layer_done(layer_idx: int, submodule_finalized: bool = False, **_: Any) -> None:
        event(layer=int(layer_idx), finalized=bool(submodule_finalized))

    gm.layer_callback = layer_done
    event(stage="quantize")
    gm.quantize(samples, batch_size=1, calibration_data_min_length=0)
    event(stage="save")
    gm.save(job["out"])
    event(stage="done")
    progress.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qalora.quantizers.gptq.child JOB.json  (internal: the GPTQModel child process)")
    _child_main(sys.argv[1])
