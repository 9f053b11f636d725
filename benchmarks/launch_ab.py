"""Which decode kernels are programmatic dependent launches, A/B through the decoder's knobs (``norm_pdl``,
``gemv_pdl``, ``attn_pdl``), bf16 cuBLAS in the same process (CUDA; the ``qalora bench`` harness).

    PYTHONPATH=. python3 benchmarks/launch_ab.py --json OUT.json

A variant is (the RMSNorm passes, (qkv and gate_up, o and down), the attention); the shipped rule is
``decoder.gemv_pdl``. Results: benchmarks/RESULTS.md, round 10.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qalora.bench import time_decode  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402

VARIANTS = {"old": (False, (True, True), False), "none": (False, (False, False), False),
            "norm": (True, (True, True), False), "norm/none": (True, (False, False), False),
            "norm/in": (True, (True, False), False), "norm/res": (True, (False, True), False),
            "norm+attn": (True, (True, True), True), "norm/in+attn": (True, (True, False), True),
            "norm/none+attn": (True, (False, False), True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    res: dict[str, float] = {}
    dev = torch.device("cuda")

    def go(hn: StaticDecoder, tag: str, names: list[str], batches: tuple[int, ...]) -> None:
        for name in names:
            hn.norm_pdl, hn.gemv_pdl, hn.attn_pdl = VARIANTS[name]
            for b in batches:
                r = time_decode(hn, b, 128, 64, 3)
                res[f"{tag}/{name}/B{b}"] = r["tokens_per_s"]
                print(f"{tag:5s} {name:15s} B={b:<3d} {r['tokens_per_s']:8.1f} tok/s", flush=True)

    with torch.no_grad():
        hn = StaticDecoder(synthetic_source("llama-7b", 4, 128, dev, torch.bfloat16), "dense_cublas", torch.bfloat16)
        go(hn, "bf16", ["old", "norm", "norm+attn"], (1, 8, 16, 32))
        del hn
        torch.cuda.empty_cache()
        for bits, batches in ((4, (1, 8, 16, 32)), (2, (1, 8)), (3, (1, 8))):
            hn = StaticDecoder(synthetic_source("llama-7b", bits, 128, dev, torch.bfloat16), "lowbit", torch.bfloat16)
            go(hn, f"{bits}b", list(VARIANTS), batches)
            del hn
            torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
