"""Prefill with the wgmma dequant-GEMM on chosen weights, at chosen block shapes and K splits (``auto`` elsewhere),
A/B in one process (CUDA, Hopper): synthetic LLaMA-7B INT4 g128, ``time_prefill`` (graph replays, median of 3),
ms per ``[VARIANT.]PLAN@TOKENS`` in the JSON.

    PYTHONPATH=. python3 benchmarks/prefill_shapes_ab.py --json OUT.json [--tokens 512,1024,2048]
    PYTHONPATH=. python3 benchmarks/prefill_shapes_ab.py --json OUT.json --tokens 512 \\
        --plans "auto;o=0/2,down=0/2;qkv=0/2,o=0/2,down=0/2" \\
        --variant head=shipped --variant split256=shipped:QLB_GEMM_SPLIT_ROWS=256,@SPLIT_MAX_ROWS=256

A plan routes weights to the wgmma GEMM: ``;``-separated plans, each ``auto`` or ``,``-separated ``SHAPE`` (the
shape's ``gemm_config``, no split) or ``SHAPE=CFG/SPLITS`` (block shape ``gpu_matmul.GEMM_CONFIGS[CFG]``, K in
SPLITS ranges); SHAPE one of qkv, o, gate_up, down. ``auto`` is ``gpu_matmul.large_m_path``'s choice: the wgmma GEMM
on gate_up, and on every weight up to ``wgmma_auto_max_m`` tokens on the GPUs where that was measured faster (H100:
1024); dequantize + cuBLAS elsewhere (``--variant old=shipped:@WGMMA_AUTO_MAX_M=0``: gate_up only, on any GPU). The
default plans: ``auto``, the wgmma GEMM also on qkv, o, down, or all three, then ``auto`` and ``qkv`` again at the end
for the run-to-run spread. ``--variant`` as in ``gemm_ab.py`` (kernel builds side by side; without it, the shipped
kernels): every plan runs on every variant. A plan a variant cannot run (K split at a block shape wider than its
``SPLIT_MAX_ROWS``) is recorded as null.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gemm_ab import Variant, parse_variant, using  # noqa: E402

from qalora.bench import time_prefill  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels import cuda_ext, gpu_matmul  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
PLANS = "auto;qkv;o;down;qkv,o,down;auto;qkv"


def parse_plan(text: str) -> dict[tuple[int, int], tuple[int | None, int]]:
    """``qkv=0/2,o`` -> {(N, K) of the weight: (block shape or None for gemm_config's, splits)}."""
    plan = {}
    for item in (i for i in text.split(",") if i and i != "auto"):
        shape, _, how = item.partition("=")
        if shape not in SHAPES:
            raise SystemExit(f"plan {text!r}: {shape!r} is not one of {sorted(SHAPES)}")
        cfg, _, sp = how.partition("/")
        if how and not (cfg.isdigit() and int(cfg) in gpu_matmul.GEMM_CONFIGS and sp.isdigit() and int(sp) >= 1):
            raise SystemExit(f"plan {text!r}: {item!r} must be SHAPE=CFG/SPLITS with CFG one of "
                             f"{sorted(gpu_matmul.GEMM_CONFIGS)} and SPLITS >= 1")
        plan[SHAPES[shape]] = (int(cfg), int(sp)) if how else (None, 1)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", default="512,1024,2048")
    ap.add_argument("--plans", default=PLANS, help="';'-separated plans (see above)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=SOURCE[:DEFINE,...] as in gemm_ab.py")
    args = ap.parse_args()
    plans = [(p, parse_plan(p)) for p in args.plans.split(";")]
    variants = [parse_variant(spec) for spec in args.variant] or [Variant("", cuda_ext.ext(), {})]
    shipped_path, shipped_gemm = gpu_matmul.large_m_path, gpu_matmul.wgmma_gemm
    chosen: dict[tuple[int, int], tuple[int | None, int]] = {}

    def path(pw, prefer="auto", dtype=None, m=None):  # matmul looks large_m_path and wgmma_gemm up at every call
        if prefer == "auto" and (pw.out_features, pw.in_features) in chosen:
            return "wgmma"
        return shipped_path(pw, prefer, dtype, m)

    def gemm(x, pw, cfg=None, **kw):
        if cfg is None and "splits" not in kw:
            cfg, kw["splits"] = chosen.get((pw.out_features, pw.in_features), (None, 1))
        return shipped_gemm(x, pw, cfg, **kw)

    gpu_matmul.large_m_path, gpu_matmul.wgmma_gemm = path, gemm
    res: dict[str, list[float | None]] = {}
    with torch.no_grad():
        src = synthetic_source("llama-7b", 4, 128, torch.device("cuda"), torch.bfloat16)
        hn = StaticDecoder(src, "lowbit", torch.bfloat16)
        for name, plan in plans:
            for v in variants:
                chosen.clear()
                chosen.update(plan)
                with using(v):
                    refused = [c for c, sp in plan.values()
                               if sp > 1 and gpu_matmul.GEMM_CONFIGS[c][0] > gpu_matmul.SPLIT_MAX_ROWS]
                    for t in (int(s) for s in args.tokens.split(",")):
                        tag = f"{v.name + '.' if v.name else ''}{name}@{t}"
                        ms = None if refused else time_prefill(hn, t, 3)
                        res.setdefault(tag, []).append(ms)
                        print(f"{tag:40s} " + (f"{ms:8.2f} ms" if ms is not None else
                                               f"not built: split K at block shapes {refused}"), flush=True)
                        Path(args.json).write_text(json.dumps(res, indent=1))
    gpu_matmul.large_m_path, gpu_matmul.wgmma_gemm = shipped_path, shipped_gemm


if __name__ == "__main__":
    main()
