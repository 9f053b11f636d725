"""Per-kernel timings of the low-bit CUDA kernels against cuBLAS bf16 on LLaMA-7B shapes (CUDA).

    PYTHONPATH=. python3 benchmarks/kernel_sweep.py --json OUT.json [--bits 4,3,2] [--sections gemv,largem,attn]

gemv: the skinny kernel at M = 1/8/16/32 (warps per tile x pipeline stages swept at M <= 8), used
as in the decode step (qkv and gate_up with the RMSNorm prologue on an fp32 stream, o and down
accumulating into it), with its achieved bandwidth (codes + coefficients + activations + output), and
cuBLAS bf16 F.linear on the same shape.
largem: the fused dequant-GEMM (Triton; every config of FUSED_CONFIGS) and dequant + cuBLAS (the skinny
kernel at M <= 32) against cuBLAS bf16 (--large-m rows), and the dequant kernel alone.
attn: the decode attention over context splits, block sizes and warps (sweep_attn).
Timings: CUDA-graph replays of 20 calls (no launch gaps), median of 15, inputs reused (L2 warm
for the activations, not for the weights: every weight set below is larger than the 50 MB L2
except o_proj, whose weights are rotated over 4 copies).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from qalora.kernels import gpu_matmul
from qalora.kernels.prepared import prepare_weight

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def rand_pw(n: int, k: int, bits: int, g: int = 128, glu: bool = False, bias: bool = False):
    q = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // g, device="cuda") * 0.004 + 0.001).half()
    z = torch.rand(n, k // g, device="cuda") * ((1 << bits) - 1)
    b = torch.randn(n, device="cuda") if bias else None
    pw = prepare_weight(q, s, z, bits, g, k, bias=b, glu=glu)
    pw.drop_canonical()
    return pw


def time_us(fn, calls: int = 20, reps: int = 15) -> float:
    """Median per-call microseconds of ``fn`` replayed ``calls`` times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000 / calls)
    return statistics.median(ts)


def copies(make, n: int, nbytes: int) -> list:
    """Enough copies of a weight that cycling through them defeats the 50 MB L2."""
    return [make() for _ in range(max(1, min(4, -(-120_000_000 // max(nbytes, 1)))))]


NORM_SHAPES = {"qkv", "gate_up"}  # as in the decode step: RMSNorm fused on an fp32 stream; o/down add into it


def sweep_gemv(bits: int, rows: list[dict], ms: tuple[int, ...] = (1, 8, 16, 32)) -> None:
    for name, (n, k) in SHAPES.items():
        pws = copies(lambda: rand_pw(n, k, bits), 4, n * k * bits // 8)
        dense = copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 4, n * k * 2) if bits == 4 else []
        norm = name in NORM_SHAPES
        nw = torch.rand(k, device="cuda") + 0.5
        for m in ms:
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x = xb.float() if norm else xb
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            acc = torch.zeros(m, n, device="cuda")
            it = {"i": 0}
            configs = [(w, st) for w in (4, 8) for st in (2, 3, 4)] if m <= 8 else [(None, gpu_matmul.DEFAULT_STAGES)]
            for warps, stages in configs:
                def run(warps=warps, stages=stages):
                    pw = pws[it["i"] % len(pws)]
                    if norm:
                        gpu_matmul.gemv(x, pw, out=out, norm_weight=nw, dtype=torch.bfloat16, warps=warps, stages=stages)
                    else:
                        gpu_matmul.gemv(x, pw, out=acc, accumulate=True, warps=warps, stages=stages)
                    it["i"] += 1
                us = time_us(run)
                nbytes = pws[0].nbytes() + x.numel() * x.element_size() + out.numel() * 2
                rows.append({"kind": "gemv", "bits": bits, "shape": name, "m": m, "warps": warps, "stages": stages,
                             "norm": norm, "us": us, "TBps": nbytes / us / 1e6})
            if dense:
                def cub():
                    F.linear(xb, dense[it["i"] % len(dense)], out=out)
                    it["i"] += 1
                us = time_us(cub)
                rows.append({"kind": "cublas_bf16", "bits": 16, "shape": name, "m": m, "us": us,
                             "TBps": (n * k * 2 + xb.numel() * 2 + out.numel() * 2) / us / 1e6})
            best = min((r for r in rows if r["kind"] == "gemv" and r["shape"] == name and r["m"] == m and r["bits"] == bits),
                       key=lambda r: r["us"])
            cub_us = rows[-1]["us"] if dense else float("nan")
            print(f"{bits}b {name} m={m}: best gemv {best['us']:.1f} us ({best['TBps']:.2f} TB/s, warps={best['warps']}, "
                  f"stages={best['stages']}); cuBLAS bf16 {cub_us:.1f} us; all: "
                  + " ".join(f"{r['warps']}/{r['stages']}:{r['us']:.1f}" for r in rows
                             if r["kind"] == "gemv" and r["shape"] == name and r["m"] == m and r["bits"] == bits),
                  flush=True)
        del pws, dense
        torch.cuda.empty_cache()


# (block_m, block_t, warps, stages, chunks, join): configs that fit sm_90a's shared memory with few or no
# register spills (compiled offline with triton's ptxas)
FUSED_CONFIGS = [(128, 8, 4, 3, 1, 0), (256, 8, 8, 3, 1, 0), (128, 8, 8, 3, 1, 0), (128, 8, 8, 3, 1, 1),
                 (256, 8, 8, 2, 1, 1), (128, 8, 8, 3, 2, 1), (128, 8, 8, 2, 2, 1), (64, 8, 8, 3, 2, 1),
                 (64, 16, 8, 3, 2, 1), (64, 8, 8, 2, 4, 1), (128, 8, 8, 2, 4, 1)]


def sweep_largem(bits: int, rows: list[dict], ms: tuple[int, ...] = (64, 256, 512, 2048), fused: bool = True) -> None:
    """dequant + cuBLAS and the fused dequant-GEMM (every config of FUSED_CONFIGS) against cuBLAS bf16;
    the fused output is checked against dequant + cuBLAS (relative error)."""
    from qalora.kernels.lowbit_gemm_triton import GemmConfig, gemm_config, gemm_fits, lowbit_gemm

    for name, (n, k) in SHAPES.items():
        pw = rand_pw(n, k, bits)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wbuf = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        rows.append({"kind": "dequant", "bits": bits, "shape": name, "us": time_us(lambda: gpu_matmul.dequant(pw, torch.bfloat16, out=wbuf), calls=5)})
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            skinny = m <= gpu_matmul.SKINNY_MAX_M  # the baseline is then the skinny kernel, not dequant + cuBLAS
            t_lb = time_us(lambda: (gpu_matmul.gemv if skinny else gpu_matmul.dequant_matmul)(x, pw), calls=5)
            t_bf = time_us(lambda: F.linear(x, w), calls=5)
            row = {"kind": "largem", "bits": bits, "shape": name, "m": m, ("gemv_us" if skinny else "dequant_cublas_us"): t_lb,
                   "cublas_bf16_us": t_bf, "ratio_bf16_over_lowbit": t_bf / t_lb}
            if fused and gemm_fits(bits, pw.group_size) and not skinny:
                ref = gpu_matmul.dequant_matmul(x, pw).float()
                fused = {}
                for bm, bt, wp, st, ch, jn in FUSED_CONFIGS:
                    if bits % ch:
                        continue
                    cfg = GemmConfig(bm, bt, wp, st, chunks=ch, join=bool(jn))
                    key = "/".join(str(v) for v in (bm, bt, wp, st, ch, jn))
                    def run(cfg=cfg):
                        return lowbit_gemm(x, pw.tiles, pw.coef, None, bits, pw.group_size, n, False, cfg)
                    try:
                        err = float((run().float() - ref).norm() / ref.norm())
                        fused[key] = {"us": time_us(run, calls=5), "rel_err_vs_dequant": err}
                    except Exception as e:  # a config the compiler cannot fit (shared memory): recorded, skipped
                        fused[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                ok = {c: v for c, v in fused.items() if "us" in v}
                best = min(ok, key=lambda c: ok[c]["us"])
                d = gemm_config(m, n, k)
                t_def = time_us(lambda: lowbit_gemm(x, pw.tiles, pw.coef, None, bits, pw.group_size, n, False, d), calls=5)
                row.update(fused=fused, fused_best=best, fused_best_us=ok[best]["us"], fused_default_us=t_def,
                           ratio_bf16_over_fused=t_bf / ok[best]["us"])
            rows.append(row)
            extra = (f", fused best {row['fused_best_us']:.1f} us ({row['fused_best']}), default {row['fused_default_us']:.1f}, "
                     f"ratio {row['ratio_bf16_over_fused']:.2f}") if "fused" in row else ""
            print(f"largem {bits}b {name} m={m}: {'gemv' if skinny else 'dequant+cublas'} {t_lb:.1f} us, bf16 {t_bf:.1f} us, "
                  f"ratio {t_bf / t_lb:.2f}{extra}", flush=True)
        del pw, w, wbuf
        torch.cuda.empty_cache()


def sweep_attn(rows: list[dict]) -> None:
    """The decode attention of 32 LLaMA-7B layers back to back (one CUDA graph, each layer its own
    cache), per layer, over context splits x block_s x warps, at B = 1/8/32 and context 128/1024."""
    from qalora.kernels.decoder_triton import attn_decode, attn_scratch, attn_splits

    h, dh, layers = 32, 128, 32
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dh, 2, device="cuda").float() / dh)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b in (1, 8, 32):
        for ctx in (128, 1024):
            s_max = ctx + 72
            qkv = torch.randn(b, 3 * h * dh, device="cuda", dtype=torch.bfloat16)
            kcs = [torch.randn(b, h, s_max, dh, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            vcs = [torch.randn_like(kc) for kc in kcs]
            out = torch.empty(b, h * dh, device="cuda", dtype=torch.bfloat16)
            pos = torch.tensor([ctx], dtype=torch.int32, device="cuda")
            auto = attn_splits(b, h, s_max, sms)
            res = {}
            for splits in sorted({1, 2, 4, 8, 16, auto}):
                sc = attn_scratch(b, h, dh, splits, torch.device("cuda"))
                for bs in (32, 64):
                    for wp in (2, 4):
                        def run(sc=sc, bs=bs, wp=wp):
                            for kc, vc in zip(kcs, vcs):
                                attn_decode(qkv, kc, vc, out, pos, inv_freq, h, h, scratch=sc, block_s=bs, num_warps=wp)
                        res[f"{splits}/{bs}/{wp}"] = time_us(run, calls=1) / layers
            best = min(res, key=res.get)
            rows.append({"kind": "attn", "batch": b, "context": ctx, "auto_splits": auto, "us_per_layer": res,
                         "best": best})
            print(f"attn B={b} ctx={ctx}: 1 split {res['1/64/4']:.2f} us/layer, auto ({auto}) "
                  f"{res[f'{auto}/64/4']:.2f}, best {best} {res[best]:.2f}", flush=True)
            del kcs, vcs
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--sections", default="gemv,largem", help="gemv, largem, attn")
    ap.add_argument("--m", default="1,8,16,32", help="gemv rows to sweep")
    ap.add_argument("--large-m", default="64,256,512,2048", help="largem rows to sweep")
    ap.add_argument("--no-fused", action="store_true", help="largem without the fused GEMM")
    args = ap.parse_args()
    rows: list[dict] = []
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for bits in [int(b) for b in args.bits.split(",")]:
        if "gemv" in args.sections:
            sweep_gemv(bits, rows, tuple(int(m) for m in args.m.split(",")))
        if "largem" in args.sections:
            sweep_largem(bits, rows, tuple(int(m) for m in args.large_m.split(",")), not args.no_fused)
    if "attn" in args.sections:
        sweep_attn(rows)
    with open(args.json, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
