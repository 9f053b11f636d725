import json

import pytest

from conftest import save_tiny_base, write_alpaca
from qalora.adapter import ADAPTER_WEIGHTS
from qalora.config import TuneParams
from qalora.manifest import read_json, sha256_file
from qalora.merge import merge
from qalora.tune import DataOrder, learning_rate, tune

PARAMS = dict(lr=5e-3, warmup_steps=2, save_every=2, dropout=0.1, micro_batch_size=3, grad_accum=2)


class Interrupt(Exception):
    pass


def test_resume_gives_identical_adapter_bytes(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json")
    p = TuneParams(steps=7, **PARAMS)
    straight = tune(base, data, tmp_path / "straight", p, progress=False)

    def stop_at_5(step, record):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        tune(base, data, tmp_path / "resumed", p, progress=False, on_step=stop_at_5)
    assert not (tmp_path / "resumed").exists()  # no half-written adapter
    assert (tmp_path / "resumed.checkpoints" / "step-000004").is_dir()
    resumed = tune(base, data, tmp_path / "resumed", p, progress=False)
    assert resumed["resumed_from_step"] == 4
    assert sha256_file(tmp_path / "straight" / ADAPTER_WEIGHTS) == sha256_file(tmp_path / "resumed" / ADAPTER_WEIGHTS)
    assert resumed["metrics"]["final_loss"] == straight["metrics"]["final_loss"]
    assert not (tmp_path / "resumed.checkpoints").exists()
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 7


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        tune(base, data, tmp_path / name, TuneParams(steps=2, seed=seed, **PARAMS), progress=False)
    h = {n: sha256_file(tmp_path / n / ADAPTER_WEIGHTS) for n in "abc"}
    assert h["a"] == h["b"] != h["c"]


def test_loss_decreases(tmp_path):
    # lr 3e-3 keeps the run in the stable regime: at 1e-2 the loss curve is chaotic after ~15 steps,
    # and the last-ulp differences between ATen's AVX2 and AVX-512 kernels end it at 0.77x or 0.83x
    # of the first loss. Here default, avx2 and avx512 give the same curve to 3 decimals (0.706x).
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json", n=8)
    m = tune(base, data, tmp_path / "ad", TuneParams(steps=40, lr=3e-3, warmup_steps=0, micro_batch_size=8,
                                                      dropout=0.0, save_every=100), progress=False)
    assert m["metrics"]["final_loss"] < 0.8 * m["metrics"]["first_loss"]


def test_checkpoint_of_other_params_refused(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json")

    def stop(step, record):
        raise Interrupt

    with pytest.raises(Interrupt):
        tune(base, data, tmp_path / "ad", TuneParams(steps=4, **PARAMS | {"save_every": 1}), progress=False, on_step=stop)
    with pytest.raises(ValueError, match="belongs to a different tune"):
        tune(base, data, tmp_path / "ad", TuneParams(steps=4, rank=4, **PARAMS), progress=False)


def test_empty_data_file(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="empty.json is empty"):
        tune(base, tmp_path / "empty.json", tmp_path / "ad", TuneParams(steps=1), progress=False)


@pytest.mark.parametrize("record, message", [
    ({"instruction": "hi"}, "record 1 needs a non-empty string 'output'"),
    ({"output": "x", "input": ""}, "record 1 needs a non-empty string 'instruction'"),
    ({"instruction": "a", "output": "b", "input": 3}, "record 1 field 'input' must be a string"),
    ("just text", "record 1 is str"),
])
def test_malformed_alpaca_record(tmp_path, record, message):
    base = save_tiny_base(tmp_path / "base")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, record]))
    with pytest.raises(ValueError, match=message):
        tune(base, path, tmp_path / "ad", TuneParams(steps=1), progress=False)


def test_adapter_from_another_base_refused(tmp_path):
    base_a = save_tiny_base(tmp_path / "a", seed=0)
    base_b = save_tiny_base(tmp_path / "b", seed=1)
    tune(base_a, write_alpaca(tmp_path / "d.json"), tmp_path / "ad", TuneParams(steps=1), progress=False)
    with pytest.raises(ValueError, match="was tuned on base .* not on this base"):
        merge(base_b, tmp_path / "ad", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_manifest_records_inputs(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_alpaca(tmp_path / "a.json")
    m = tune(base, data, tmp_path / "ad", TuneParams(steps=1), progress=False)
    assert m["inputs"]["data"]["sha256"] == sha256_file(data)
    assert m["inputs"]["base"]["sha256"] == sha256_file(base / "model.safetensors")
    assert read_json(tmp_path / "ad" / "manifest.json")["params"]["steps"] == 1


def test_learning_rate_schedule():
    p = TuneParams(steps=10, lr=1.0, warmup_steps=2, schedule="cosine")
    lrs = [learning_rate(s, p) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0


def test_data_order_covers_each_epoch_once():
    order = DataOrder(n=10, micro_batch=5, seed=3)
    epoch0 = order.micro_batch_indices(0) + order.micro_batch_indices(1)
    assert sorted(epoch0) == list(range(10))
    assert DataOrder(10, 5, 3).micro_batch_indices(2) == order.micro_batch_indices(2)
