"""Prefill with the wgmma dequant-GEMM on chosen non-GLU weights (``auto`` elsewhere), A/B in one process (CUDA,
Hopper): synthetic LLaMA-7B INT4 g128, ``time_prefill`` (graph replays, median of 3).

    PYTHONPATH=. python3 benchmarks/prefill_shapes_ab.py --json OUT.json [--tokens 512,1024,2048]

Variants: ``auto`` (gpu_matmul.large_m_path: the wgmma GEMM on gate_up, dequantize + cuBLAS elsewhere), then the
wgmma GEMM also on qkv, o, down, or all three; ``auto`` and ``qkv`` again at the end for the run-to-run spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qalora.bench import time_prefill  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels import gpu_matmul  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "down": (4096, 11008)}  # (N, K)
VARIANTS = ("auto", "qkv", "o", "down", "qkv+o+down", "auto", "qkv")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", default="512,1024,2048")
    args = ap.parse_args()
    shipped = gpu_matmul.large_m_path
    chosen: set[tuple[int, int]] = set()

    def path(pw, prefer="auto", dtype=None):  # matmul looks large_m_path up at every call
        if prefer == "auto" and (pw.out_features, pw.in_features) in chosen:
            return "wgmma"
        return shipped(pw, prefer, dtype)

    gpu_matmul.large_m_path = path
    res: dict[str, list[float]] = {}
    with torch.no_grad():
        src = synthetic_source("llama-7b", 4, 128, torch.device("cuda"), torch.bfloat16)
        hn = StaticDecoder(src, "lowbit", torch.bfloat16)
        for name in VARIANTS:
            chosen.clear()
            chosen.update(SHAPES[k] for k in name.split("+") if k in SHAPES)
            for t in (int(v) for v in args.tokens.split(",")):
                ms = time_prefill(hn, t, 3)
                res.setdefault(f"{name}/{t}", []).append(ms)
                print(f"{name:12s} {t:5d} tokens {ms:8.2f} ms", flush=True)
    gpu_matmul.large_m_path = shipped
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
