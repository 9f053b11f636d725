"""The quantize stage: load the full-precision base, quantize it (GPTQ or RTN, :mod:`qalora.quantizers`),
write the canonical low-bit folder (:mod:`qalora.checkpoint`) with its manifest."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from qalora.checkpoint import save_lowbit_model
from qalora.config import QuantizeParams
from qalora.data import calibration_windows, load_texts
from qalora.device import resolve_device
from qalora.manifest import check_output_path, sha256_file
from qalora.model_io import load_base_model
from qalora.quantizers import GPTQConfig, QuantizeConfig, RTNConfig, check_targets, quantize_


def quantizer_config(params: QuantizeParams) -> QuantizeConfig:
    """The quantizer config the params' ``quantize`` section describes."""
    if params.method == "gptq":
        return GPTQConfig(params.bits, params.group_size, tuple(params.targets), sym=params.sym,
                          damp_percent=params.damp_percent,
                          device=resolve_device(params.device, key="quantize.device"))
    return RTNConfig(params.bits, params.group_size, tuple(params.targets), sym=params.sym)


def quantize_to_folder(
    source: str,
    out: str | Path,
    params: QuantizeParams,
    calibration: str | Path | None = None,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """The quantize stage: load the fp base, quantize (GPTQ or RTN), write the canonical folder.

    ``calibration`` (text/jsonl) is required for GPTQ. Returns the folder's manifest.
    """
    check_output_path(out, "quantize")  # refuse a bad --out now, not after calibration
    model, tokenizer = load_base_model(source, trust_remote_code=trust_remote_code)
    check_targets(model, params.targets, params.group_size)  # fail fast, before calibration
    config = quantizer_config(params)
    inputs: dict = {"model": {"path": str(source),
                              "sha256": sha256_file(source) if Path(source).is_file() else None}}
    t0 = time.perf_counter()
    if config.method == "gptq":
        if calibration is None:
            raise ValueError("GPTQ needs calibration text: pass --calib FILE (or use --method rtn)")
        windows = calibration_windows(load_texts(calibration), tokenizer, params.calib_samples, params.calib_seq_len)
        inputs["calibration"] = {"path": str(calibration), "sha256": sha256_file(calibration)}
        work = Path(out).with_name(Path(out).name + ".gptq-work")
        try:
            quantize_(model, config, tokenizer=tokenizer, calibration=windows, work_dir=work, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        quantize_(model, config, progress=progress)
    seconds = time.perf_counter() - t0
    # the manifest records where it ran (GPTQ's float arithmetic differs between a CPU and a GPU)
    ran_on = {"device": getattr(config, "device", "cpu")}
    return save_lowbit_model(model, tokenizer, out, method=params.method, stage="quantize",
                             params=params.model_dump() | ran_on, inputs=inputs,
                             metrics={"quantize_seconds": seconds})
