"""Merge exactness on the real SmolLM2-135M (slow): quantize, tune a few real steps, merge, check.

GPTQ on this model is covered by test_gptq.py; RTN keeps this test to minutes on a 2-core CPU.
"""

import pytest

from qalora.check import check_merge
from qalora.config import CheckParams, QuantizeParams, TuneParams
from qalora.merge import merge
from qalora.paths import DEFAULT_GGUF, sources_dir
from qalora.quantize import quantize_to_folder
from qalora.tune import tune

GGUF = sources_dir() / DEFAULT_GGUF


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} missing: run `make sources`")
def test_smollm2_merge_is_exact(tmp_path):
    from qalora.paths import ALPACA_DEMO, source_file

    base = tmp_path / "int4.g64"
    quantize_to_folder(str(GGUF), base, QuantizeParams(method="rtn", bits=4, group_size=64), progress=False)
    tune(base, source_file(ALPACA_DEMO), tmp_path / "adapter",
         TuneParams(steps=2, lr=1e-3, warmup_steps=0, max_seq_len=128, micro_batch_size=2, save_every=100),
         progress=False)
    manifest = merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert manifest["metrics"]["max_abs_zero_shift"] > 0
    report = check_merge(base, tmp_path / "adapter", tmp_path / "merged",
                         CheckParams(max_new_tokens=8, prompts=["What is the capital of France?", "Name a color."]))
    checks = report["checks"]
    assert report["passed"], report["failed"]
    assert checks["codes"]["layers"] == 30 * 7 and checks["codes"]["layers_with_changed_codes"] == 0
    assert checks["logits"]["max_rel_error"] <= 1e-3 and checks["logits"]["greedy_identical_prompts"] == 2
    assert checks["deploy"]["backends"] == ["int4pack"]
