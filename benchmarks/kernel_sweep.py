"""Tune and measure the low-bit kernels on LLaMA-7B shapes (run on a CUDA device).

    PYTHONPATH=. python3 benchmarks/kernel_sweep.py --out DIR [--budget-s 300]

Writes DIR/sweep.json (every timing) and DIR/tuned_configs.json (best config per
(bits, M bucket, N, K), the dense twin's, and the large-M path choice), which
``qalora.kernels.gpu`` loads from ``QALORA_TUNED_CONFIGS`` or its packaged copy.
Timings: ``triton.testing.do_bench`` medians, L2 flushed between runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from qalora.kernels import gpu
from qalora.kernels.prepared import prepare_weight

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
# M == 1: (block_n, nb, warps, stages, prefetch, scalar); split-K is chosen to give ~4-8 programs per SM
GEMV_M1 = [(16, 32, 4, 1, False, False), (16, 32, 4, 1, True, False), (16, 32, 4, 3, False, False),
           (64, 16, 4, 1, True, False), (64, 16, 4, 3, False, False), (32, 16, 4, 2, False, False),
           (16, 32, 4, 1, False, True), (16, 32, 4, 1, True, True), (32, 32, 4, 1, True, True),
           (16, 64, 4, 1, True, True), (8, 32, 2, 1, True, True), (32, 32, 8, 1, True, True)]
# M > 1 (tensor cores): (block_n, nb, warps, stages)
GEMV_DOT = [(64, 32, 4, 1), (64, 16, 4, 1), (64, 32, 4, 2), (64, 16, 4, 3), (128, 16, 8, 2)]
GEMM = [gpu.GemmConfig(128, 128, 2, 8, True, 8, 3), gpu.GemmConfig(64, 128, 4, 8, True, 4, 4),
        gpu.GemmConfig(128, 256, 4, 8, True, 8, 3)]
DEQ = [(32, 4, 4), (16, 8, 4), (64, 4, 8), (32, 8, 8), (16, 16, 4)]


def split_for(n: int, k: int, bn: int, nb: int, m_tiles: int = 1, target: int = 6 * 132) -> int:
    split = 1
    while -(-n // bn) * m_tiles * split < target and k // 32 // (split * 2) >= nb:
        split *= 2
    return split


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rand_pw(n: int, k: int, bits: int, g: int = 128):
    q = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // g, device="cuda") * 0.004 + 0.001).half()
    z = torch.rand(n, k // g, device="cuda") * ((1 << bits) - 1)
    return prepare_weight(q, s, z, bits, g, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--sections", default="gemv,dense,largem")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    left = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731
    log: dict = {"device": torch.cuda.get_device_name(), "gemv": [], "dense": [], "large_m": []}
    tuned: dict = {"device": log["device"], "gemv": [], "dense": [], "gemm": [], "large_m_path": []}
    dt = torch.bfloat16
    bits_list = [int(b) for b in args.bits.split(",")]
    best_cfgs: dict = {}
    sections = args.sections.split(",")
    for bits in bits_list if "gemv" in sections else []:
        for name, (n, k) in SHAPES.items():
            pw = rand_pw(n, k, bits)
            for m in (1, 8, 32):
                if left() < 60:
                    break
                mb = gpu.m_bucket(m)
                x = torch.randn(m, k, device="cuda", dtype=dt)
                o32 = torch.zeros(m, n, device="cuda")
                if (bits, mb, name) in best_cfgs:
                    cands = best_cfgs[(bits, mb, name)]
                elif mb == 1:
                    cands = [gpu.GemvConfig(bn, nb, split_for(n, k, bn, nb), 1, w, st, pf, sc)
                             for bn, nb, w, st, pf, sc in GEMV_M1]
                else:
                    cands = [gpu.GemvConfig(bn, nb, split_for(n, k, bn, nb, -(-m // mb)), mb, w, st)
                             for bn, nb, w, st in GEMV_DOT]
                res = []
                for cfg in cands:
                    for xp in ((True, False) if mb > 1 else (True,)):
                        try:
                            xx = x
                            fn = lambda: gpu.gemv(xx, pw, out=o32, accumulate=True, x_perm=xp, cfg=cfg)  # noqa: E731
                            ms = bench(fn)
                        except Exception as e:  # noqa: BLE001
                            print("FAIL", bits, name, m, cfg, repr(e)[:300])
                            continue
                        res.append((ms, cfg, xp))
                        log["gemv"].append({"bits": bits, "shape": name, "m": m, "cfg": asdict(cfg), "x_perm": xp,
                                            "ms": ms, "GBps": pw.nbytes() / ms / 1e6})
                res.sort(key=lambda r: r[0])
                if not res:
                    continue
                for ms, cfg, xp in res[:3]:
                    print(f"gemv {bits}b {name:8s} m={m:<3d} {ms * 1e3:7.1f} us {pw.nbytes() / ms / 1e6:7.0f} GB/s "
                          f"x_perm={xp} {cfg}", flush=True)
                ms, cfg, xp = res[0]
                tuned["gemv"].append([bits, mb, n, k, asdict(cfg)])
                for b2 in (3, 2):
                    best_cfgs.setdefault((b2, mb, name), list(dict.fromkeys(c for _, c, _ in res[:4]))[:3])
            del pw
    # dense twin (bf16) vs cuBLAS
    for name, (n, k) in SHAPES.items() if "dense" in sections else []:
        w = torch.randn(n, k, device="cuda", dtype=dt)
        for m in (1, 8, 32):
            if left() < 40:
                break
            x = torch.randn(m, k, device="cuda", dtype=dt)
            o32 = torch.zeros(m, n, device="cuda")
            ms_cub = bench(lambda: torch.matmul(x, w.t()))
            res = []
            mb = gpu.m_bucket(m)
            for bn, bk, wps in ([(16, 512, 4), (32, 256, 4), (8, 1024, 4)] if mb == 1 else [(64, 128, 4), (32, 128, 4), (64, 64, 4)]):
                for split in (1, 2, 4):
                    cfg = gpu.DenseGemvConfig(bn, bk, split, mb, wps, 1)
                    try:
                        ms = bench(lambda: gpu.dense_gemv(x, w, out=o32, accumulate=True, cfg=cfg))
                    except Exception as e:  # noqa: BLE001
                        print("FAIL dense", name, m, cfg, repr(e)[:200])
                        continue
                    res.append((ms, cfg))
            res.sort(key=lambda r: r[0])
            ms, cfg = res[0]
            tuned["dense"].append([mb, n, k, asdict(cfg)])
            log["dense"].append({"shape": name, "m": m, "cublas_ms": ms_cub, "triton_ms": ms, "cfg": asdict(cfg),
                                 "cublas_GBps": n * k * 2 / ms_cub / 1e6, "triton_GBps": n * k * 2 / ms / 1e6})
            print(f"dense {name:8s} m={m:<3d} cuBLAS {ms_cub * 1e3:7.1f} us  triton {ms * 1e3:7.1f} us  {cfg}", flush=True)
        del w
    # large M: fused vs dequant + cuBLAS vs bf16 cuBLAS (dequant kernel tuned on the first shape)
    for bits in bits_list if "largem" in sections else []:
        for name, (n, k) in SHAPES.items():
            if left() < 20:
                break
            pw = rand_pw(n, k, bits)
            if "dequant" not in tuned:
                dres = []
                for bn, nb, w in DEQ:
                    try:
                        dres.append((bench(lambda: gpu.dequant(pw, dt, block_n=bn, nb=nb, num_warps=w)), (bn, nb, w)))
                    except Exception as e:  # noqa: BLE001
                        print("FAIL dequant", bn, nb, w, repr(e)[:200])
                dres.sort()
                for ms, c in dres:
                    print(f"dequant {bits}b {name} {c}: {ms * 1e3:.1f} us  {(n * k * 2 + pw.nbytes()) / ms / 1e6:.0f} GB/s")
                bn, nb, w = dres[0][1]
                tuned["dequant"] = {"block_n": bn, "nb": nb, "num_warps": w}
                gpu.DEQUANT_CFG.update(tuned["dequant"])
            wd = gpu.dequant(pw, dt)
            for m in (256, 512, 2048):
                x = torch.randn(m, k, device="cuda", dtype=dt)
                ms_bf16 = bench(lambda: torch.matmul(x, wd.t()))
                ms_deq = bench(lambda: gpu.dequant_matmul(x, pw))
                res = []
                for cfg in GEMM if bits == 4 else GEMM[:1]:
                    try:
                        res.append((bench(lambda: gpu.gemm(x, pw, cfg=cfg)), cfg))
                    except Exception as e:  # noqa: BLE001
                        print("FAIL gemm", bits, name, m, cfg, repr(e)[:200])
                res.sort(key=lambda r: r[0])
                ms_f, cfg = res[0] if res else (float("inf"), None)
                path = "fused" if ms_f <= ms_deq else "dequant"
                if m == 512 and cfg is not None:
                    tuned["gemm"].append([bits, n, k, asdict(cfg)])
                    tuned["large_m_path"].append([bits, n, k, path])
                log["large_m"].append({"bits": bits, "shape": name, "m": m, "bf16_cublas_ms": ms_bf16,
                                       "dequant_cublas_ms": ms_deq, "fused_ms": ms_f,
                                       "cfg": asdict(cfg) if cfg else None})
                print(f"largeM {bits}b {name:8s} m={m:<5d} bf16 {ms_bf16 * 1e3:8.1f} us  deq+cuBLAS {ms_deq * 1e3:8.1f} us"
                      f"  fused {ms_f * 1e3:8.1f} us  best/bf16 {ms_bf16 / min(ms_f, ms_deq):5.2f}x  {cfg}", flush=True)
            del pw, wd
    (out / "sweep.json").write_text(json.dumps(log, indent=1))
    (out / "tuned_configs.json").write_text(json.dumps(tuned, indent=1))
    print(f"sweep done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
