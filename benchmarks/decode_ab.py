"""Decode and prefill of one synthetic model under the decoder's knobs, A/B in one process (CUDA).

    PYTHONPATH=. python3 benchmarks/decode_ab.py --json OUT.json [--model llama-7b] [--bits 4]

The low-bit decoder with the decode attention's context splits on (auto) with and without its dependent
launch and off (one program per head, rounds 1-4), then prefill with dequantize + cuBLAS, with the
wgmma dequant-GEMM and with ``auto``'s mix of the two (``PREFILL``); bf16 cuBLAS (``dense_cublas``) with the same attention variants and
cuBLAS prefill. ``--variant NAME=SOURCE`` also times the low-bit decode with another version of
``lowbit_cuda.cu`` (``cuda_ext.build``) on the same model in the same process, before the shipped kernels.
The same harness as ``qalora bench`` (``time_decode``/``time_prefill``: CUDA-graph replays, context 128,
64 steps, median of ``--reps``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qalora.bench import copy_bandwidth, time_decode, time_prefill  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels import cuda_ext, gpu_matmul  # noqa: E402
from qalora.kernels.gpu_matmul import wgmma_available  # noqa: E402

ATTN = {"split+pdl": (None, True), "split": (None, False), "one program per head": (1, False)}
PREFILL = ("dequant", "wgmma", "auto")  # the low-bit decoder's large-M paths (gpu_matmul.large_m_path); wgmma: Hopper


def run(hn: StaticDecoder, batches: list[int], prefills: list[int], prefill_paths: tuple[str, ...], reps: int,
        attn: list[str], wgmma_min_m: list[int]) -> dict:
    res: dict = {"decode": {}, "prefill_ms": {}}
    default_min_m = gpu_matmul.WGMMA_MIN_M
    for name in attn:
        splits, pdl = ATTN[name]
        hn.attn_split_count, hn.attn_pdl = splits, pdl
        for b in batches:
            for mm in wgmma_min_m if hn.mode == "lowbit" else [default_min_m]:
                gpu_matmul.WGMMA_MIN_M = mm
                r = time_decode(hn, b, 128, 64, reps)
                key = f"{name}/{b}" + (f"/wgmma>={mm}" if mm != default_min_m else "")
                res["decode"][key] = r
                print(f"{hn.mode:12s} {name:22s} B={b:<3d} {r['tokens_per_s']:9.1f} tok/s"
                      + (f" (wgmma GEMM from M={mm})" if hn.mode == "lowbit" else ""), flush=True)
    gpu_matmul.WGMMA_MIN_M = default_min_m
    hn.attn_split_count, hn.attn_pdl = None, False
    for path in prefill_paths:
        hn.large_m = path
        for t in prefills:
            res["prefill_ms"][f"{path}/{t}"] = ms = time_prefill(hn, t, reps)
            print(f"{hn.mode:12s} prefill {path:8s} {t:5d} tok {ms:8.2f} ms", flush=True)
    hn.large_m = "auto"
    return res


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
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="activation / compute dtype")
    ap.add_argument("--variant", action="append", default=[], help="NAME=SOURCE: decode with that lowbit_cuda.cu too")
    ap.add_argument("--attn", default=",".join(ATTN), help="attention variants to time")
    ap.add_argument("--wgmma-min-m", default=str(gpu_matmul.WGMMA_MIN_M),
                    help="decode batches from which the low-bit GEMMs run the wgmma GEMM (gpu_matmul.WGMMA_MIN_M)")
    args = ap.parse_args()
    min_ms = [int(v) for v in args.wgmma_min_m.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    prefills = [int(t) for t in args.prefill.split(",") if t]
    dt = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    src = synthetic_source(args.model, args.bits, args.group_size, torch.device("cuda"), dt)
    out: dict = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "python": platform.python_version()},
                 "args": vars(args), "copy_bandwidth_GBps": copy_bandwidth()}
    hn = StaticDecoder(src, "lowbit", dt)
    shipped_ext = gpu_matmul.ext
    for spec in args.variant:  # every kernel call goes through gpu_matmul.ext
        name, _, path = spec.partition("=")
        gpu_matmul.ext = functools.partial(cuda_ext.build, Path(path).read_text())  # cached after the first
        out.setdefault("lowbit_variants", {})[name] = run(hn, batches, [], (), args.reps, args.attn.split(","), min_ms)
    gpu_matmul.ext = shipped_ext
    paths = PREFILL if wgmma_available(torch.device("cuda")) else ("dequant",)
    out["lowbit"] = run(hn, batches, prefills, paths, args.reps, args.attn.split(","), min_ms)
    out["lowbit"]["bytes_per_step"] = hn.weight_bytes()
    del hn
    torch.cuda.empty_cache()
    if not args.no_dense:
        hn = StaticDecoder(src, "dense_cublas", dt)
        out["dense_cublas"] = run(hn, batches, prefills, ("auto",), args.reps, args.attn.split(","), min_ms)
        del hn
        lb, dn = out["lowbit"], out["dense_cublas"]
        out["ratio"] = {
            "decode": {k: v["tokens_per_s"] / dn["decode"]["/".join(k.split("/")[:2])]["tokens_per_s"]
                       for k, v in lb["decode"].items()},
            "prefill": {k: dn["prefill_ms"][f"auto/{k.split('/')[1]}"] / v for k, v in lb["prefill_ms"].items()},
        }
        print(json.dumps(out["ratio"], indent=1), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
