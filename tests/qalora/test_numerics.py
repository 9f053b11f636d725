"""The numeric mode: deterministic mode gives the same bytes whatever CPU path the machine would take.

One machine stands in for several: ATEN_CPU_CAPABILITY and MKL_CBWR select the kernels an older or
newer CPU would run (AVX-512/AMX machines run avx512 by default, AMD EPYC avx2, old CPUs scalar code).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer, write_alpaca
from qalora import numerics
from qalora.manifest import read_json

QALORA = str(Path(sys.executable).parent / "qalora")


def _best_capability() -> str:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "avx512" if "avx512f" in flags else "avx2"


def _chain(root: Path, fp: Path, calib: Path, data: Path, env: dict[str, str]) -> dict[str, str]:
    """GPTQ W4G64 -> tune 6 steps -> merge through the CLI in fresh processes; sha256 of each artifact."""
    def cli(*args: str) -> None:
        proc = subprocess.run([QALORA, *args, "--no-progress"] if args[0] != "merge" else [QALORA, *args],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    cli("quantize", "--model", str(fp), "--method", "gptq", "--group-size", "64", "--calib", str(calib),
        "--samples", "8", "--seq-len", "64", "--out", str(root / "q"))
    cli("tune", "--base", str(root / "q"), "--data", str(data), "--out", str(root / "ad"), "--steps", "6",
        "--lr", "5e-3", "--micro-batch-size", "3", "--warmup-steps", "2", "--save-every", "100")
    cli("merge", "--base", str(root / "q"), "--adapter", str(root / "ad"), "--out", str(root / "m"))
    out = {}
    for stage, name in (("q", "model.safetensors"), ("ad", "adapter.safetensors"), ("m", "model.safetensors")):
        manifest = read_json(root / stage / "manifest.json")
        out[stage] = manifest["outputs"][name]
        out[f"{stage}.numerics"] = manifest["numerics"]["key"]
    return out


@pytest.mark.slow
def test_deterministic_mode_gives_the_same_bytes_on_every_cpu_path(tmp_path, state_dir, ext_cache):
    fp = tmp_path / "fp"
    tiny_llama().save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"The number {i} follows {i - 1} and precedes {i + 1}." * 3 for i in range(64)))
    data = write_alpaca(tmp_path / "a.json")
    base = os.environ.copy()
    for k in (*numerics.PINNED_ENV, numerics.MODE_ENV):
        base.pop(k, None)
    # The scalar path with MKL's most generic branch, and the CPU's best path with MKL choosing freely.
    old_cpu = base | {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    new_cpu = base | {"ATEN_CPU_CAPABILITY": _best_capability()}

    a = _chain(tmp_path / "a", fp, calib, data, old_cpu | {"QALORA_NUMERICS": "deterministic"})
    b = _chain(tmp_path / "b", fp, calib, data, new_cpu)  # deterministic is the CLI's default
    assert a == b
    # MKL's AVX2 branch on Intel; on AMD MKL answers the request with its AUTO branch (still strict)
    assert a["m.numerics"] == f"deterministic:AVX2:{numerics.expected_mkl_branch('deterministic'):#x}:AVX2"

    # Portable mode: MKL's COMPATIBLE branch, the one it runs alike on every vendor's CPU.
    pa = _chain(tmp_path / "pa", fp, calib, data, old_cpu | {"QALORA_NUMERICS": "portable"})
    pb = _chain(tmp_path / "pb", fp, calib, data, new_cpu | {"QALORA_NUMERICS": "portable"})
    assert pa == pb
    assert pa["m.numerics"] == "portable:AVX2:0x10003:AVX2"

    # Control: without the mode the same two settings take other kernels, and the bytes differ.
    native = _chain(tmp_path / "n", fp, calib, data, old_cpu | {"QALORA_NUMERICS": "native"})
    assert native["m.numerics"].startswith("native:DEFAULT:")
    assert native["ad"] != a["ad"] and native["m"] != a["m"]


def test_mode_is_validated_and_pins_only_in_deterministic_mode(monkeypatch):
    for k in numerics.PINNED_ENV:  # so monkeypatch restores what pin() sets
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("QALORA_NUMERICS", "fast")
    with pytest.raises(ValueError, match="QALORA_NUMERICS='fast' is not a numeric mode; valid: deterministic, portable, native"):
        numerics.pin()
    monkeypatch.setenv("QALORA_NUMERICS", "native")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert numerics.pin() == "native" and os.environ["ATEN_CPU_CAPABILITY"] == "avx512"
    monkeypatch.setenv("QALORA_NUMERICS", "deterministic")
    assert numerics.pin() == "deterministic"
    assert {k: os.environ[k] for k in numerics.PINNED_ENV} == numerics.PINNED_ENV
    monkeypatch.setenv("QALORA_NUMERICS", "portable")
    assert numerics.pin() == "portable" and os.environ["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"


def test_activate_refuses_a_process_whose_torch_ran_before_the_pin():
    """A library user who ran torch first gets a clear error, not silently machine-dependent bytes."""
    code = ("import torch; torch.ones(4).sum(); from qalora import numerics; numerics.pin(); numerics.activate()")
    env = os.environ | {"QALORA_NUMERICS": "deterministic", "ATEN_CPU_CAPABILITY": "default"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "deterministic numerics are not in effect: ATen CPU capability is DEFAULT, not AVX2" in proc.stderr


def test_cli_reports_a_bad_mode_in_one_line(tmp_path):
    proc = subprocess.run([QALORA, "merge", "--base", "x", "--adapter", "y", "--out", str(tmp_path / "m")],
                          env=os.environ | {"QALORA_NUMERICS": "fastest"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("qalora merge: error: QALORA_NUMERICS='fastest'")


def test_describe_and_explain_name_what_decides_the_bytes():
    here = numerics.describe()
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert here["key"] == numerics.key() and here["key"].startswith(here["mode"] + ":")
    json.dumps(here)  # recorded in manifests and MLflow: must be plain JSON
    other = here | {"cpu_capability": "AVX512", "torch": "0.0"}
    lines = numerics.explain(other, here)
    assert any(l.startswith("numerics.torch: recorded '0.0'") for l in lines)
    assert (here["cpu_capability"] == "AVX512") != any(l.startswith("numerics.cpu_capability") for l in lines)
