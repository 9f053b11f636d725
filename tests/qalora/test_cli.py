"""The stage CLI end to end on a tiny model: quantize (RTN) -> tune -> merge -> check."""

import json

from conftest import tiny_llama, tiny_tokenizer, write_alpaca
from qalora_pipeline.cli import main


def test_stage_chain(tmp_path, fp_model_dir, capsys):
    data = write_alpaca(tmp_path / "a.json")
    assert main(["quantize", "--model", str(fp_model_dir), "--method", "rtn", "--bits", "3", "--group-size", "64",
                 "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "q" / "qalora_quant.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 3
    assert main(["tune", "--base", str(tmp_path / "q"), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--steps", "2", "--lr", "5e-3", "--no-progress"]) == 0
    assert main(["merge", "--base", str(tmp_path / "q"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m")]) == 0
    rc = main(["check", "--base", str(tmp_path / "q"), "--adapter", str(tmp_path / "ad"),
               "--merged", str(tmp_path / "m"), "--json", str(tmp_path / "r.json"), "--max-new-tokens", "4"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and report["passed"]
    # Checking against the wrong merged folder (the base itself: zeros not moved, logits differ) fails.
    rc = main(["check", "--base", str(tmp_path / "q"), "--adapter", str(tmp_path / "ad"),
               "--merged", str(tmp_path / "q"), "--max-new-tokens", "4"])
    assert rc == 1


def test_bad_bits_exit_2(tmp_path, fp_model_dir, capsys):
    rc = main(["quantize", "--model", str(fp_model_dir), "--method", "rtn", "--bits", "5", "--out", str(tmp_path / "q")])
    assert rc == 2
    assert "quantize.bits" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_refuses_pickle_only_model(tmp_path, capsys):
    d = tmp_path / "pickled"
    tiny_llama().config.save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded: pickle checkpoints are refused before reading")
    rc = main(["quantize", "--model", str(d), "--method", "rtn", "--out", str(tmp_path / "q")])
    assert rc == 2 and "safetensors only" in capsys.readouterr().err


def test_missing_hub_id_is_clear(tmp_path, capsys):
    rc = main(["quantize", "--model", "someorg/not-cached-model", "--method", "rtn", "--out", str(tmp_path / "q")])
    assert rc == 2 and "not in the local HF cache" in capsys.readouterr().err
