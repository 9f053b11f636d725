from pathlib import Path

import pytest

from qalora.config import ParamsError, load_params


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("quantize:\n  bits: 3\ntune:\n  steps: 7\n")
    p = load_params(f, ["tune.lr=1e-3", "quantize.group_size=128"])
    assert (p.quantize.bits, p.quantize.group_size, p.tune.steps, p.tune.lr) == (3, 128, 7, 1e-3)
    assert p.quantize.tag == "int3.g128"


def test_default_yaml_is_valid():
    p = load_params("params/default.yaml")
    assert p.quantize.method == "gptq" and p.model.source.startswith("embedded:")


PARAMS = Path(__file__).resolve().parents[2] / "params"


@pytest.mark.parametrize("path", sorted(PARAMS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_is_valid(path):
    p = load_params(path)
    assert p.name and all(limit is None or limit >= 1 for limit in p.evaluate.limits().values())


def test_full_params_evaluate_everything():
    e = load_params(PARAMS / "smollm2-full.yaml").evaluate
    assert set(e.limits().values()) == {None} and e.perplexity_max_tokens is None


@pytest.mark.parametrize("override, message", [
    ("quantize.bits=5", r"quantize.bits: Value error, bits=5 is not supported; valid: \[2, 3, 4, 8\]"),
    ("tune.lrr=1", "tune.lrr: unknown key"),
    ("tune.steps=0", "tune.steps: Input should be greater than or equal to 1"),
    ("quantize.method=awq", "quantize.method: Input should be 'gptq' or 'rtn'"),
    ("tune", "expected KEY=VALUE"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(None, [override])


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- a list\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(f)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
