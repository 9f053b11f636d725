"""Export a canonical low-bit model (merged or not) to the formats serving stacks load, keeping the merge.

A merged QA-LoRA model has integer codes, fp16 scales and *float* zeros. Integer-zero formats
(GPTQ/AWQ checkpoints, GGUF Q4_0) cannot hold it without re-quantizing; these can:

| format | consumer | how the float zero is kept | error vs our fp32 model |
|---|---|---|---|
| ``gguf`` | llama.cpp, Ollama, LM Studio; transformers' GGUF loader | Q4_1 ``w = d*q + m``, ``d = s``, ``m = -s*z`` (fp16) | fp16 rounding of ``m``: <= ``abs(z)*2^-11`` steps |
| ``hqq`` | ``hqq`` (``AutoHQQHFModel.from_quantized``) | ``(q - zero) * scale``, zero kept fp32 | none at ``compute_dtype=float32`` |

:func:`export_model` writes the export into a stage folder (atomic, with ``manifest.json``, stage
``export``), then loads it back through its real consumers and measures what the export changed:
the max weight error in quantization steps (against our fp32 dequantization), the max relative L2
logits error and greedy agreement on a few prompts. A model a format cannot hold is refused before
anything is written, with an :class:`ExportError` naming the limit (bit width, group size, architecture).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from qalora.checkpoint import load_lowbit_model, lowbit_layers, model_identity, read_quant_config
from qalora.data import alpaca_prompt, prompt_ids
from qalora.export.errors import ExportError
from qalora.manifest import atomic_output_dir, write_json_atomic, write_manifest

__all__ = ["FORMATS", "ExportError", "check_exportable", "export_model"]

FORMATS = ("gguf", "hqq")
STAGE = "export"
REPORT = "export.json"
GGUF_FILE = "model.gguf"
DEFAULT_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about low-bit quantization.",
    "Explain why the sky is blue in one sentence.",
)
# The export passes when its weights are within this many quantization steps of ours (GGUF: the fp16
# rounding of m = -s*z is at most |z| * 2^-11 steps, < 0.008 for 4-bit zeros in [0, 15] and < 0.03
# for zeros pushed to +-60 by a merge; HQQ at fp32: 0).
WEIGHT_TOL_STEPS = 0.03


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def check_exportable(model_dir: str | Path, fmt: str) -> dict[str, Any]:
    """Refuse (ExportError naming the limit) a model ``fmt`` cannot hold; cheap (reads the configs)."""
    from qalora.export import gguf as gguf_export
    from qalora.export import hqq as hqq_export

    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: valid are {', '.join(FORMATS)}")
    model_dir = Path(model_dir)
    quant, config = read_quant_config(model_dir), _config(model_dir)
    if fmt == "gguf":
        return gguf_export.check_gguf(config, quant)
    if importlib.util.find_spec("hqq") is None:
        raise ExportError("the HQQ export is loaded back and measured through the hqq package, which is "
                          "not installed: pip install 'qalora[export]' (hqq==0.2.8.post1)")
    return hqq_export.check_hqq(config, quant)


# --- comparing a consumer's model with ours -----------------------------------------------------

def _greedy_hf(model, ids: torch.Tensor, n: int, pad: int) -> list[int]:
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad)[0, ids.shape[1]:].tolist()


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _summarize(rows: list[dict[str, Any]], decode) -> dict[str, Any]:
    compared = sum(len(r["ref"]) for r in rows)
    return {
        "max_rel_error": max(r["rel"] for r in rows),
        "max_abs_error": max(r["abs"] for r in rows),
        "greedy_identical_prompts": sum(r["ref"] == r["out"] for r in rows),
        "prompts": len(rows),
        "greedy_tokens_compared": compared,
        "greedy_prefix_agreement": sum(_prefix(r["ref"], r["out"]) for r in rows) / max(compared, 1),
        "samples": [{"prompt": r["prompt"], "ours": decode(r["ref"]), "consumer": decode(r["out"])} for r in rows[:2]],
    }


@torch.no_grad()
def _reference(model, tokenizer, prompts, max_new_tokens) -> list[dict[str, Any]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)  # Alpaca-wrapped, as the check compares
        rows.append({"prompt": prompt, "text": alpaca_prompt(prompt), "ids": ids, "logits": model(ids).logits[0].double(),
                     "ref": _greedy_hf(model, ids, max_new_tokens, pad)})
    return rows


def _compare(rows, logits_fn, greedy_fn) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        got = logits_fn(r["ids"]).double()
        ref = r["logits"]
        out.append({"prompt": r["prompt"], "ref": r["ref"], "out": greedy_fn(r["ids"], len(r["ref"])),
                    "rel": ((got - ref).norm() / ref.norm()).item(), "abs": (got - ref).abs().max().item()})
    return out


@torch.no_grad()
def _hf_consumer(model, tokenizer, rows, name: str) -> dict[str, Any]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    compared = _compare(rows, lambda ids: model(ids).logits[0].float(), lambda ids, n: _greedy_hf(model, ids, n, pad))
    return {"consumer": name, **_summarize(compared, tokenizer.decode)}


def _llama_cpp_consumer(path: Path, tokenizer, rows, n_ctx: int) -> dict[str, Any]:
    import llama_cpp.llama_cpp as lc
    import numpy as np
    from llama_cpp import Llama

    # Weights stay in llama.cpp's plain CPU buffers (use_extra_bufts=False): on a CPU with AMX, ggml's
    # AMX repacking of Q4_1 segfaults in ggml_backend_amx_mul_mat (llama-cpp-python 0.3.36, built
    # natively here), even on the SmolLM2 Q4_1 GGUF we start from. Llama() exposes no switch for it.
    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    finally:
        lc.llama_model_default_params = default

    def logits(ids):
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))

    def greedy(ids, n):
        llm.reset()
        toks = ids[0].tolist()
        llm.eval(toks)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return out

    compared = _compare(rows, logits, greedy)
    tok_same = all(llm.tokenize(r["text"].encode(), add_bos=False, special=False) == r["ids"][0].tolist()
                   for r in rows)
    import llama_cpp

    return {"consumer": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "tokenizer_identical": tok_same,
            **_summarize(compared, tokenizer.decode)}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# --- export -------------------------------------------------------------------------------------

def export_model(model_dir: str | Path, fmt: str, out: str | Path, *, prompts: list[str] | tuple[str, ...] | None = None,
                 max_new_tokens: int = 16, name: str | None = None, dense_type: str = "f32",
                 tokenizer_pre: str | None = None, hqq_compute_dtypes: tuple[str, ...] = ("float32", "float16"),
                 consumers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Export the low-bit folder ``model_dir`` to ``fmt`` (``gguf`` or ``hqq``) in the folder ``out``.

    Returns the report (also ``out/export.json``): what was written, the weight error in
    quantization steps, and per consumer the max relative logits error and greedy agreement on
    ``prompts`` against our fp32 model. ``consumers`` (gguf; default both): ``transformers`` and
    ``llama.cpp`` (skipped, and said so, when llama-cpp-python is not installed). HQQ is loaded by
    hqq at fp32 (the weight figure: exact) and at each of ``hqq_compute_dtypes``. Raises
    ExportError, before writing anything, for a model the format cannot hold.
    """
    from qalora.export import gguf as gguf_export
    from qalora.export import hqq as hqq_export

    model_dir = Path(model_dir)
    check_exportable(model_dir, fmt)
    prompts = list(prompts or DEFAULT_PROMPTS)
    model, tokenizer, quant = load_lowbit_model(model_dir)
    for layer in lowbit_layers(model).values():  # frozen: dequantize each layer once (same fp32 numbers)
        layer.cache_dequantized = True
    if tokenizer is None:
        raise ExportError(f"{model_dir} has no tokenizer files: an export carries the tokenizer")
    if fmt == "gguf":  # the tokenizer must fit too, before anything is written
        gguf_export.tokenizer_metadata(tokenizer, model.config.vocab_size, tokenizer_pre)
    source = {"path": str(model_dir), "sha256": model_identity(model_dir)}
    params = {"format": fmt, "prompts": prompts, "max_new_tokens": max_new_tokens, "dense_type": dense_type,
              "tokenizer_pre": tokenizer_pre, "hqq_compute_dtypes": list(hqq_compute_dtypes)}
    rows = _reference(model, tokenizer, prompts, max_new_tokens)
    report: dict[str, Any] = {"format": fmt, "source": source, "consumers": {}}
    with atomic_output_dir(out, STAGE) as tmp:
        if fmt == "gguf":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = tmp / GGUF_FILE
            report["written"] = gguf_export.write_gguf(
                model, tokenizer, quant, path, name=name or model_dir.name, dense_type=dense_type,
                tokenizer_pre=tokenizer_pre)
            report["file"] = GGUF_FILE
            report["weights"] = gguf_export.weight_error(model, path)
            wanted = consumers or ("transformers", "llama.cpp")
            if "transformers" in wanted:
                hf = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
                hf_tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=GGUF_FILE)
                res = _hf_consumer(hf, tokenizer, rows, "transformers GGUF loader (dequantizes Q4_1 to fp32)")
                res["tokenizer_identical"] = all(
                    hf_tok(r["text"]).input_ids == r["ids"][0].tolist() for r in rows)
                report["consumers"]["transformers"] = res
                del hf
            if "llama.cpp" in wanted:
                if llama_cpp_available():
                    n_ctx = min(model.config.max_position_embeddings, 2048)
                    report["consumers"]["llama.cpp"] = _llama_cpp_consumer(path, tokenizer, rows, n_ctx)
                else:
                    report["consumers"]["llama.cpp"] = {"skipped": "llama-cpp-python is not installed"}
        else:
            report["written"] = hqq_export.write_hqq(model, tokenizer, quant, tmp)
            report["file"] = hqq_export.WEIGHTS
            for dt in dict.fromkeys(("float32", *hqq_compute_dtypes)):  # fp32 first: the weight figure
                dtype = getattr(torch, dt)
                hm = hqq_export.load_hqq(tmp, compute_dtype=dtype)
                res = _hf_consumer(hm, tokenizer, rows, f"hqq {_version('hqq')} AutoHQQHFModel.from_quantized, compute_dtype={dt}")
                res["weights"] = hqq_export.weight_error(model, hm)
                report["consumers"][f"hqq-{dt}"] = res
                del hm
            report["weights"] = report["consumers"]["hqq-float32"]["weights"]
        report["exact_within_steps"] = WEIGHT_TOL_STEPS
        report["passed"] = report["weights"].get("max_error_steps", float("inf")) <= WEIGHT_TOL_STEPS
        write_json_atomic(tmp / REPORT, report)
        write_manifest(tmp, STAGE, params, {"model": source}, extra={"metrics": _metrics(report)})
    return report


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat numeric figures of a report (for the manifest and MLflow)."""
    out = {"weight_max_error_steps": float(report["weights"].get("max_error_steps", float("nan")))}
    for name, c in report["consumers"].items():
        if "max_rel_error" in c:
            key = name.replace(".", "_")
            out[f"{key}_max_rel_error"] = float(c["max_rel_error"])
            out[f"{key}_greedy_prefix_agreement"] = float(c["greedy_prefix_agreement"])
    return out
