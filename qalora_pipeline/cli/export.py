"""``qalora export``: a low-bit folder (quantize or merge output) to GGUF Q4_1 (llama.cpp, Ollama) or
HQQ, keeping the float zeros, measured through the formats' real consumers (:mod:`qalora.export`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from qalora.export import export_model

    report = export_model(args.model, args.format, args.out, max_new_tokens=args.max_new_tokens,
                          dense_type=args.dense_type, tokenizer_pre=args.tokenizer_pre)
    summary = {
        "out": str(args.out), "file": report["file"], "passed": report["passed"],
        "weight_max_error_steps": report["weights"].get("max_error_steps"),
        "consumers": {name: ({k: c[k] for k in ("max_rel_error", "greedy_identical_prompts", "prompts",
                                               "greedy_prefix_agreement")} if "max_rel_error" in c else c)
                      for name, c in report["consumers"].items()},
        "note": report["written"].get("note"),
    }
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0 if report["passed"] else 1


def add_export(sub) -> argparse.ArgumentParser:
    """Register ``qalora export`` on an argparse subparsers object."""
    p = sub.add_parser("export", help="export a low-bit model to GGUF (Q4_1: llama.cpp, Ollama) or HQQ, keeping "
                                      "the merge; exit 1 when the weights moved beyond the bound")
    p.add_argument("--model", type=Path, required=True, help="low-bit folder (qalora quantize/merge --out)")
    p.add_argument("--format", required=True, choices=["gguf", "hqq"], help="gguf: model.gguf with Q4_1 projections; "
                   "hqq: hqq's AutoHQQHFModel folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically, with manifest.json)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared per check prompt")
    p.add_argument("--dense-type", choices=["f32", "f16"], default="f32",
                   help="gguf: embeddings/untied head in F32 (exact) or F16 (half the size)")
    p.add_argument("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name (default: from tokenizer.json)")
    p.set_defaults(func=cmd_export)
    return p
