"""GPTQ (via GPTQModel, converted to the canonical format) on the embedded SmolLM2-135M: time and perplexity.

For each bit width: load the fp32 model from the GGUF, GPTQ-quantize the 7 projections of every
block (asymmetric, contiguous groups, calibration windows from c4_demo.jsonl), and measure
perplexity on wiki_demo.txt (qalora.perplexity: non-overlapping windows). Prints a markdown table
and optionally writes the figures as JSON. One GPTQ run at a time (it uses every core).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_perplexity.py --bits 4 3 2 --rtn --json out.json

LowBitLinear layers cache their dequantized weight while perplexity runs (the base is frozen, so the
figures are the same; it only avoids re-dequantizing every layer for every batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from qalora.data import calibration_windows, load_texts  # noqa: E402
from qalora.quantizers.gptq import quantize_model_gptq  # noqa: E402
from qalora.lowbit import LowBitLinear  # noqa: E402
from qalora.model_io import DEFAULT_TARGETS, load_base_model  # noqa: E402
from qalora.paths import C4_DEMO, DEFAULT_GGUF, WIKI_DEMO, source_file  # noqa: E402
from qalora.perplexity import perplexity  # noqa: E402
from qalora.quantizers.rtn import quantize_model_rtn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--max-tokens", type=int, default=40_000, help="perplexity: first N tokens of wiki_demo")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    p.add_argument("--rtn", action="store_true", help="also measure RTN at the same bits/group (baseline)")
    p.add_argument("--no-gptq", action="store_true", help="skip GPTQ (e.g. with --rtn for the baseline only)")
    p.add_argument("--no-fp", action="store_true", help="skip the fp32 perplexity row")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--work-dir", type=Path, default=None, help="GPTQ scratch space (default: a temp dir)")
    args = p.parse_args(argv)

    model_path = args.model or str(source_file(DEFAULT_GGUF))
    text = source_file(WIKI_DEMO).read_text(encoding="utf-8")
    texts = load_texts(source_file(C4_DEMO))
    rows: list[dict] = []

    def ppl(model, tok) -> float:
        for m in model.modules():
            if isinstance(m, LowBitLinear):
                m.cache_dequantized = True
        out = perplexity(model, tok, text, context=args.context, max_tokens=args.max_tokens, progress=False)
        return out["perplexity"]

    def report(row: dict) -> None:
        rows.append(row)
        secs = "" if row["quant_s"] is None else f"{row['quant_s']:.1f}"
        print(f"| {row['config']:<14} | {secs:>8} | {row['perplexity']:>10.2f} | {row['ppl_s']:>6.1f} |", flush=True)

    print(f"model {model_path}; calibration {args.samples}x{args.seq_len} tokens of c4_demo; "
          f"wiki_demo perplexity, first {args.max_tokens} tokens, context {args.context}; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    print("| config         | quant s  | perplexity | ppl s  |", flush=True)
    print("|----------------|----------|------------|--------|", flush=True)

    model, tok = load_base_model(model_path)
    if not args.no_fp:
        t = time.perf_counter()
        report({"config": "fp32", "method": "none", "bits": None, "quant_s": None, "perplexity": ppl(model, tok),
                "ppl_s": time.perf_counter() - t})
    calib = calibration_windows(texts, tok, args.samples, args.seq_len)
    del model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    for bits in args.bits:
        if not args.no_gptq:
            model, tok = load_base_model(model_path)
            t = time.perf_counter()
            quantize_model_gptq(model, tok, calib, bits, args.group_size, DEFAULT_TARGETS, sym=args.sym,
                                work_dir=work, progress=sys.stderr.isatty())
            quant_s = time.perf_counter() - t
            t = time.perf_counter()
            report({"config": f"GPTQ W{bits}G{args.group_size}", "method": "gptq", "bits": bits,
                    "quant_s": quant_s, "perplexity": ppl(model, tok), "ppl_s": time.perf_counter() - t})
            del model
        if args.rtn:
            model, tok = load_base_model(model_path)
            t = time.perf_counter()
            quantize_model_rtn(model, bits, args.group_size, DEFAULT_TARGETS, sym=args.sym, progress=False)
            quant_s = time.perf_counter() - t
            t = time.perf_counter()
            report({"config": f"RTN W{bits}G{args.group_size}", "method": "rtn", "bits": bits, "quant_s": quant_s,
                    "perplexity": ppl(model, tok), "ppl_s": time.perf_counter() - t})
            del model

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": model_path, "group_size": args.group_size, "sym": args.sym, "samples": args.samples,
            "seq_len": args.seq_len, "context": args.context, "max_tokens": args.max_tokens,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
