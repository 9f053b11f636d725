"""``qalora`` command line: one subcommand per stage, each running alone on folders.

Every stage reads the experiment schema (``--params FILE``, ``--set key=value``); its flags are
shorthands for the matching keys (``--bits 3`` is ``--set quantize.bits=3``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from qalora import numerics

# No hub access and no telemetry at run time, unless the user explicitly set these.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
# Before torch runs: the numeric mode decides which kernels every library picks (qalora/numerics.py).
# A bad QALORA_NUMERICS is reported by main(), as one line.
try:
    numerics.pin()
except ValueError:
    pass


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
                       "sym": "quantize.sym", "model": "model.source", "calib": "data.calibration"})
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
                                     "gradient_checkpointing")}
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


# --- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qalora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a fp model (HF folder, .gguf, cached hub id) to the canonical low-bit format")
    q.add_argument("--model", help="HF folder, .gguf file or hub id (default: params model.source, the embedded SmolLM2-135M)")
    q.add_argument("--bits", type=int, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, help="group size along D_in; must divide every target layer's D_in (default 64)")
    q.add_argument("--method", choices=["gptq", "rtn"], help="GPTQ (GPTQModel, default) or round-to-nearest")
    q.add_argument("--calib", help="calibration text: .txt or .jsonl with 'text' (default: embedded c4_demo.jsonl)")
    q.add_argument("--samples", type=int, help="calibration windows (default 32)")
    q.add_argument("--seq-len", type=int, help="tokens per calibration window (default 512)")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric quantization (default asymmetric)")
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
    t.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype (default fp32; bf16 is slow on CPU)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    _add_common(t)
    t.set_defaults(func=cmd_tune)

    m = sub.add_parser("merge", help="fold the adapter into the quantized zeros (codes and scales untouched)")
    m.add_argument("--base", type=Path, required=True, help="quantized base folder the adapter was tuned on")
    m.add_argument("--adapter", type=Path, required=True, help="adapter folder (qalora tune --out)")
    m.add_argument("--out", type=Path, required=True, help="merged low-bit model folder")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("check", help="bit-exactness check of a merge; exits 1 when it fails")
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--adapter", type=Path, required=True)
    c.add_argument("--merged", type=Path, required=True)
    c.add_argument("--json", type=Path, help="write the report here")
    c.add_argument("--rel-tol", type=float, help="max relative logit error (default 1e-3)")
    c.add_argument("--max-new-tokens", type=int, help="greedy tokens compared per prompt (default 16)")
    _add_common(c)
    c.set_defaults(func=cmd_check)

    # Stage modules that register their own subcommands (present once their stage exists).
    for module in ("qalora.evaluate", "qalora.bench", "flows.cli"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        numerics.activate()
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        if os.environ.get("QALORA_DEBUG"):
            raise
        print(f"qalora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
