"""Per-kernel time of one decode step of the synthetic LLaMA-7B harness (torch.profiler, no graph).

    PYTHONPATH=. python3 benchmarks/profile_decode.py --bits 4 --batch 1,8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from qalora.decoder import StaticDecoder, synthetic_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--mode", default="lowbit")
    args = ap.parse_args()
    src = synthetic_source("llama-7b", args.bits, 128, torch.device("cuda"), torch.bfloat16)
    hn = StaticDecoder(src, args.mode, torch.bfloat16)
    for b in [int(v) for v in args.batch.split(",")]:
        hn.alloc(b, 256)
        hn.pos.fill_(128)
        with torch.no_grad():
            for _ in range(2):
                hn.decode_step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                hn.decode_step()
                torch.cuda.synchronize()
        print(f"=== {args.mode} {args.bits}-bit batch {b}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        hn.free()


if __name__ == "__main__":
    main()
