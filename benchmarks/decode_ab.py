"""Decode and prefill of one synthetic model under the decoder's knobs, A/B in one process (CUDA).

    PYTHONPATH=. python3 benchmarks/decode_ab.py --json OUT.json [--model llama-7b] [--bits 4]

The low-bit decoder with the decode attention's context splits on (auto) with and without its dependent
launch and off (one program per head, rounds 1-4), then prefill with dequantize + cuBLAS and with the
fused dequant-GEMM (``PREFILL``); bf16 cuBLAS (``dense_cublas``) with the same attention variants and
cuBLAS prefill.
The same harness as ``qalora bench`` (``time_decode``/``time_prefill``: CUDA-graph replays, context 128,
64 steps, median of ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qalora.bench import copy_bandwidth, time_decode, time_prefill  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels import gpu_matmul  # noqa: E402

ATTN = {"split+pdl": (None, True), "split": (None, False), "one program per head": (1, False)}
PREFILL = ("dequant", "fused")  # the low-bit decoder's large-M paths (gpu_matmul.large_m_path)


def run(hn: StaticDecoder, batches: list[int], prefills: list[int], prefill_paths: tuple[str, ...], reps: int,
        attn: list[str], gemv_bps: list[int] = ()) -> dict:
    res: dict = {"decode": {}, "prefill_ms": {}}
    # the attention variants, then (low-bit) the GEMV grids: stream-K with n blocks per SM, 0 = per tile pair
    variants = [(name, *ATTN[name], None) for name in attn]
    variants += [(f"split/gemv-bps{n}", None, False, n) for n in gemv_bps]
    for name, splits, pdl, bps in variants:
        hn.attn_split_count, hn.attn_pdl = splits, pdl
        default_bps = gpu_matmul.STREAM_BLOCKS_PER_SM
        if bps is not None:
            gpu_matmul.STREAM_BLOCKS_PER_SM = bps
        for b in batches:
            r = time_decode(hn, b, 128, 64, reps)
            res["decode"][f"{name}/{b}"] = r
            print(f"{hn.mode:12s} {name:22s} B={b:<3d} {r['tokens_per_s']:9.1f} tok/s", flush=True)
        gpu_matmul.STREAM_BLOCKS_PER_SM = default_bps
    hn.attn_split_count, hn.attn_pdl = None, False
    for path in prefill_paths:
        hn.large_m = path
        for t in prefills:
            res["prefill_ms"][f"{path}/{t}"] = ms = time_prefill(hn, t, reps)
            print(f"{hn.mode:12s} prefill {path:8s} {t:5d} tok {ms:8.2f} ms", flush=True)
    hn.large_m = "auto"
    return res


def dense_key(key: str) -> str:
    """The bf16 decode a low-bit one is compared with: the same attention and batch (GEMV grids are low-bit only)."""
    parts = key.split("/")
    return "/".join(p for p in parts if not p.startswith("gemv-bps"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", default="1,8,16,32")
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--attn", default=",".join(ATTN), help="attention variants to time")
    ap.add_argument("--gemv-bps", default="", help="low-bit decode also with these GEMV grids (blocks per SM, "
                    "0: one block per tile pair), e.g. 0,1,2")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    prefills = [int(t) for t in args.prefill.split(",") if t]
    dt = torch.bfloat16
    src = synthetic_source(args.model, args.bits, args.group_size, torch.device("cuda"), dt)
    out: dict = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "python": platform.python_version()},
                 "args": vars(args), "copy_bandwidth_GBps": copy_bandwidth()}
    hn = StaticDecoder(src, "lowbit", dt)
    bps = [int(n) for n in args.gemv_bps.split(",") if n]
    out["lowbit"] = run(hn, batches, prefills, PREFILL, args.reps, [a for a in args.attn.split(",") if a], bps)
    out["lowbit"]["bytes_per_step"] = hn.weight_bytes()
    del hn
    torch.cuda.empty_cache()
    if not args.no_dense:
        hn = StaticDecoder(src, "dense_cublas", dt)
        out["dense_cublas"] = run(hn, batches, prefills, ("auto",), args.reps, [a for a in args.attn.split(",") if a])
        del hn
        lb, dn = out["lowbit"], out["dense_cublas"]
        out["ratio"] = {
            "decode": {k: lb["decode"][k]["tokens_per_s"] / dn["decode"][dense_key(k)]["tokens_per_s"]
                       for k in lb["decode"]},
            "prefill": {k: dn["prefill_ms"][f"auto/{k.split('/')[1]}"] / v for k, v in lb["prefill_ms"].items()},
        }
        print(json.dumps(out["ratio"], indent=1), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
