"""The whole chain on one GPU at 7B scale: quantize -> tune -> merge -> check -> bench -> eval on a
random-weight LLaMA-7B-shaped HF folder, each stage through the same core call the pipeline makes,
with wall time and peak GPU memory per stage; plus check + bench on Qwen2- and Mistral-shaped
folders (the families whose blocks the fast decode harness does or does not take). One JSON.

    python benchmarks/gpu_chain.py --tokenizer DIR --data data --json $OUT/gpu_chain_h200.json
    python benchmarks/gpu_chain.py --tokenizer DIR --data data --smoke --json /tmp/chain.json   # CPU ok

``--tokenizer``: a HF tokenizer folder (the run used SmolLM2's, 49,152 tokens, so the model's vocab
is 49,152, not LLaMA's 32,000). ``--data``: the project's data/ (Alpaca demo to tune on, MMLU for
the evaluation). Random weights: accuracy is chance; the figures are time and memory.

Evaluation: MMLU 5-shot (``--mmlu-limit`` questions per subject), the merged low-bit model through
its kernels (weights stay low-bit, dequantized per call) vs the same weights dequantized into a bf16
model, one process, the same questions.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096)
SMOKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)


def log(*a) -> None:
    print(*a, flush=True)


def gpu_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


SAVE = [lambda: None]  # writes the JSON so far: a run stopped by its time limit still reports its stages


class Stage:
    """Times a stage and records its peak GPU memory (reset at entry) into ``record``."""

    def __init__(self, record: dict, name: str) -> None:
        self.record, self.name = record, name

    def __enter__(self):
        gc.collect()
        self.device_peak, self._stop = 0, threading.Event()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            # A stage may run on the GPU in a child process (GPTQModel): sample the device's used memory.
            free, total = torch.cuda.mem_get_info()
            self.device_base = total - free
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.t0 = time.perf_counter()
        log(f"== {self.name}")
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            free, total = torch.cuda.mem_get_info()
            self.device_peak = max(self.device_peak, total - free - self.device_base)

    def __exit__(self, kind, err, tb):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row = {"seconds": round(time.perf_counter() - self.t0, 2), "peak_gpu_gb": round(gpu_gb(), 3)}
        if torch.cuda.is_available():
            self._stop.set()
            self._sampler.join()
            # every process's memory on the device (CUDA contexts included), above the stage's start
            row["peak_device_used_gb"] = round(self.device_peak / 1e9, 3)
        if err is not None:
            row["error"] = "".join(traceback.format_exception_only(kind, err)).strip()[-2000:]
            log(traceback.format_exc())
        self.record[self.name] = row
        log(f"   {self.name}: {row}")
        SAVE[0]()
        return True  # record the failure, go on with what does not depend on it


def build_folder(folder: Path, family: str, shape: dict, tokenizer, device: str) -> None:
    """A random-weight HF folder of ``family`` (bf16 safetensors, as released checkpoints ship) + tokenizer."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
             "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True})}
    cfg_cls, model_cls, extra = kinds[family]
    cfg = cfg_cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16", **shape, **extra)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(cfg).to(torch.bfloat16)
    if family == "qwen2":  # Qwen2's q/k/v biases, k_proj's reaching tens as in released checkpoints
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 8)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model


def chain(args, tokenizer, work: Path, family: str, shape: dict, out: dict, full: bool) -> None:
    """The stages on one folder; ``full``: also tune on the GPU and evaluate (else a fresh adapter)."""
    from qalora.bench import run_bench
    from qalora.check import check_to_folder
    from qalora.config import CheckParams, QuantizeParams, TuneParams
    from qalora.merge import merge
    from qalora.quantize import quantize_to_folder
    from qalora.tune import tune

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rec: dict = {"family": family, "shape": shape, "stages": {}}
    out.setdefault("models", []).append(rec)
    st = rec["stages"]
    fp, base, adapter, merged = (work / family / n for n in ("fp", "base", "adapter", "merged"))
    with Stage(st, "build"):
        build_folder(fp, family, shape, tokenizer, dev)
        rec["fp_folder_gb"] = round(sum(f.stat().st_size for f in fp.iterdir()) / 1e9, 3)
    with Stage(st, "quantize"):
        gptq = args.quantize == "gptq" and full
        q = QuantizeParams(method="gptq" if gptq else "rtn", bits=4, group_size=128, calib_samples=args.calib_samples,
                           calib_seq_len=args.calib_len, device="auto")
        calib = calibration_file(args, work) if gptq else None
        rec["quantize"] = quantize_to_folder(str(fp), base, q, calib, progress=True)["metrics"]
        rec["quantize_method"] = q.method + (f" on {dev}, {q.calib_samples} x {q.calib_seq_len} tokens" if gptq else "")
        rec["base_folder_gb"] = round(sum(f.stat().st_size for f in base.iterdir()) / 1e9, 3)
    if args.until == "quantize":
        return
    with Stage(st, "tune"):
        tp = TuneParams(steps=args.tune_steps if full else 1, lr=2e-4, rank=16 if full else 4, micro_batch_size=4,
                        max_seq_len=512, warmup_steps=0, gradient_checkpointing=full, save_every=1000,
                        device="auto")
        m = tune(base, Path(args.data) / "train" / "alpaca_en_demo.json", adapter, tp, progress=False)
        rec["tune"] = {k: m.get(k) for k in ("metrics", "device", "dtype") if k in m}
    with Stage(st, "merge"):
        rec["merge"] = merge(base, adapter, merged).get("metrics")
        rec["merged_folder_gb"] = round(sum(f.stat().st_size for f in merged.iterdir()) / 1e9, 3)
        rec["merged_storage"] = json.loads((merged / "manifest.json").read_text()).get("storage")
    if "check" not in args.skip:
        with Stage(st, "check"):
            cp = CheckParams(device="auto", max_new_tokens=8, prompts=["Give three tips for staying healthy.",
                                                                        "What is the capital of France?"])
            check_to_folder(base, adapter, merged, work / family / "check", cp)
            report = json.loads((work / family / "check" / "check.json").read_text())
            rec["check"] = {"passed": report["passed"], "failed": report["failed"], "device": report.get("device"),
                            **{k: {kk: v for kk, v in c.items() if not isinstance(v, (list, dict))}
                               for k, c in report["checks"].items()},
                            "deploy_backends": report["checks"]["deploy"].get("backends")}
    if "bench" not in args.skip:
        with Stage(st, "bench"):
            b = run_bench(model=merged, batches=[1, 8] if full else [1], prefills=[512], dtype="bfloat16",
                          steps=32 if full else 8, device=dev, log=log)
            rec["bench"] = {k: b.get(k) for k in ("harness", "harness_reason", "model", "ratio_lowbit_over_dense",
                                                   "lowbit", "dense", "ratios", "figures") if k in b}
    if full and "eval" not in args.skip:
        evaluate_both(args, merged, rec)


def calibration_file(args, work: Path) -> Path:
    """GPTQ calibration text with at least ``calib_samples x calib_len`` tokens: the C4 demo, repeated as
    often as needed (random weights: the text only sets the work, not the result's quality)."""
    texts = [json.loads(line)["text"] for line in (Path(args.data) / "calibration" / "c4_demo.jsonl").open()]
    path = work / "calibration.jsonl"
    chars_needed = args.calib_samples * args.calib_len * 6  # > 4 characters per token in English text
    with path.open("w") as f:
        written = 0
        while written < chars_needed:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
                written += len(t)
    return path


def evaluate_both(args, merged: Path, rec: dict) -> None:
    """MMLU 5-shot: the low-bit model through its kernels vs its weights dequantized to bf16."""
    from qalora.bench import dense_
    from qalora.eval_model import load_eval_model
    from qalora.evaluate import evaluate

    data = Path(args.data) / "eval"
    kw = dict(tasks=["mmlu"], num_fewshot=5, limit=args.mmlu_limit, batch_size=args.eval_batch, data_dir=data,
              progress=False)
    for variant in ("lowbit", "bf16"):
        with Stage(rec["stages"], f"eval_{variant}"):
            m, tok, info = load_eval_model(merged, dtype="bf16", device="cuda" if torch.cuda.is_available() else "cpu")
            if variant == "bf16":
                dense_(m, torch.bfloat16)
            resident = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            r = evaluate(m, tok, **kw)
            n, secs = r["timing"]["questions"], r["timing"]["lm_eval_wall_s"]
            rec[f"eval_{variant}"] = {"questions": n, "lm_eval_seconds": round(secs, 2),
                                      "questions_per_s": round(n / secs, 3), "model_bytes_gb": round(resident / 1e9, 3),
                                      "mmlu_acc": r["groups"].get("mmlu", {}).get("acc"),
                                      "peak_gpu_gb": round(gpu_gb(), 3)}
            del m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", default="data")
    ap.add_argument("--json", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    ap.add_argument("--tune-steps", type=int, default=10)
    ap.add_argument("--mmlu-limit", type=int, default=4, help="questions per MMLU subject")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--families", default="qwen2,mistral,llama")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out: check, bench, eval")
    ap.add_argument("--quantize", choices=["rtn", "gptq"], default="rtn",
                    help="the full (LLaMA) chain's quantizer: GPTQ runs on the GPU (quantize.device auto)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--until", choices=["quantize", "all"], default="all", help="stop after this stage")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the LLaMA-7B shape (default its 32)")
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir, removed)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out: dict = {"env": {"python": platform.python_version(), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                 "argv": sys.argv}
    small = dict(SMOKE if args.smoke else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                               num_attention_heads=16, num_key_value_heads=2,
                                               max_position_embeddings=4096))
    SAVE[0] = lambda: Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for family in args.families.split(","):
            full = family == "llama"
            shape = (SMOKE if args.smoke else LLAMA_7B) if full else small
            if full and args.layers:
                shape = {**shape, "num_hidden_layers": args.layers}
            chain(args, tok, Path(tmp), family, shape, out, full)
            shutil.rmtree(Path(tmp) / family, ignore_errors=True)  # disk: 7B folders are ~20 GB together
    log(json.dumps({m["family"]: m["stages"] for m in out["models"]}, indent=1))


if __name__ == "__main__":
    main()
