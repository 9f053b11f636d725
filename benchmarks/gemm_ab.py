"""The large-M paths on LLaMA-7B shapes, one process (CUDA, Hopper): the wgmma dequant-GEMM (every block
shape of ``gpu_matmul.GEMM_CONFIGS``), dequantize + cuBLAS, and cuBLAS bf16 on a dense weight.

    PYTHONPATH=. python3 benchmarks/gemm_ab.py --json OUT.json [--m 128,256,512,2048] [--bits 4]
    PYTHONPATH=. python3 benchmarks/gemm_ab.py --json OUT.json --decode 8,16,32,64 --configs 3,4,5 --splits 1,2,4

``--variant NAME=SOURCE[:DEFINE,...]`` (repeatable): versions of ``lowbit_gemm.cu`` side by side in the same
process (``shipped`` = this tree's; ``cuda_ext.build`` with the tree's ``lowbit_cuda.cu``), each checked and
timed at every block shape and split; pseudo-defines ``@NAME=INT`` set a ``gpu_matmul`` integer while that variant
runs (``@SPLIT_MAX_ROWS=256`` with ``QLB_GEMM_SPLIT_ROWS=256``: K splits at every block shape). ``--splits``
applies to prefill rows too (blocks of at most ``SPLIT_MAX_ROWS`` x rows). Without ``--variant``: the shipped
kernels, the timings keyed ``wgmma{shape}[/{splits}]``; with it, ``{NAME}.wgmma{shape}[/{splits}]``.

    PYTHONPATH=. python3 benchmarks/gemm_ab.py --json OUT.json --m 256,512 --configs 0,1 --splits 1,2,4 \
        --variant head=shipped --variant split256=shipped:QLB_GEMM_SPLIT_ROWS=256,@SPLIT_MAX_ROWS=256

``--decode``: decode batches instead, each GEMM as the decode step calls it (qkv stores, o and down add
into the fp32 residual stream, gate_up fused with silu(gate) * up): the skinny GEMV (M <= 32), the wgmma
GEMM at each block shape of at most 64 x rows and each number of K splits, cuBLAS bf16 (+ the add).

First a check on small odd shapes (partial blocks of rows and weight tiles, K not a whole step, bias,
the GLU epilogue, groups of 32/128/256, 2/3/4 bit): each block shape's output against the fp32 product
with the dequantized weight, next to dequantize + cuBLAS's error on the same inputs, and repeat runs
bit-equal. Then timings: CUDA-graph replays, the weights rotated over copies that defeat the 50 MB L2
(``kernel_sweep.copies``), median of 7; the wgmma rows include the pass laying x out as the kernel copies it, timed
alone too (``x_image``). gate_up is a GLU weight (silu(gate) * up fused; dequant + cuBLAS then runs
the activation as its own kernel, as the decoder does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_ab import launch_knobs  # noqa: E402
from kernel_sweep import SHAPES, copies, rand_pw, time_us  # noqa: E402
from qalora.kernels import cuda_ext, gpu_matmul  # noqa: E402


class Variant(NamedTuple):
    """A build of the kernels and the ``gpu_matmul`` integers set while it runs; ``name`` prefixes its keys."""
    name: str
    mod: ModuleType
    knobs: dict[str, int]


def parse_variant(spec: str) -> Variant:
    """NAME=SOURCE[:DEFINE,...] -> its build (``SOURCE``: a ``lowbit_gemm.cu``, or ``shipped``)."""
    name, _, rest = spec.partition("=")
    src, _, defs = rest.partition(":")
    if not name or not src:
        raise SystemExit(f"--variant {spec!r}: NAME=SOURCE[:DEFINE,...]")
    defines, knobs = launch_knobs(spec, [d for d in defs.split(",") if d])
    if src == "shipped" and not defines:
        return Variant(name, cuda_ext.ext(), knobs)
    gemm = cuda_ext.GEMM_SOURCE if src == "shipped" else Path(src)
    return Variant(name, cuda_ext.build(cuda_ext.SOURCE.read_text(), defines, gemm_src=gemm.read_text()), knobs)


@contextlib.contextmanager
def using(v: Variant):
    """Every kernel call (through ``gpu_matmul.ext``) and ``v``'s knobs are ``v``'s inside the block."""
    saved = {"ext": gpu_matmul.ext, **{k: getattr(gpu_matmul, k) for k in v.knobs}}
    gpu_matmul.ext = lambda: v.mod
    for k, val in v.knobs.items():
        setattr(gpu_matmul, k, val)
    try:
        yield
    finally:
        for k, val in saved.items():
            setattr(gpu_matmul, k, val)


def key(v: Variant, cfg: int, sp: int) -> str:
    return f"{v.name + '.' if v.name else ''}wgmma{cfg}" + (f"/{sp}" if sp > 1 else "")


def split_counts(cfg: int, splits: list[int], steps: int) -> list[int]:
    """The K splits block shape ``cfg`` takes here (``SPLIT_MAX_ROWS`` as the running variant sets it)."""
    if gpu_matmul.GEMM_CONFIGS[cfg][0] > gpu_matmul.SPLIT_MAX_ROWS:
        return [1]
    return [sp for sp in splits if sp <= steps]


def reference(x: torch.Tensor, pw) -> torch.Tensor:
    """fp32 x @ W^T (+ bias) with the kernels' dequantized weight (kernel row order), GLU applied."""
    y = x.float() @ gpu_matmul.dequant(pw, torch.float32).T
    if pw.bias is not None:
        y = y + pw.bias
    if pw.glu:
        y = y.view(y.shape[0], -1, 2, 8)
        y = (F.silu(y[:, :, 0]) * y[:, :, 1]).reshape(y.shape[0], -1)
    return y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def check(rows: list, configs: list[int], splits: list[int], v: Variant) -> bool:
    ok = True
    cases = [(4, 128, 208, 768, 300, False, False), (4, 128, 208, 896, 77, False, True),
             (3, 128, 208, 768, 300, False, True), (2, 128, 208, 768, 300, False, False),
             (4, 128, 256, 512, 200, True, False), (4, 128, 208, 768, 5, False, True),
             (4, 128, 256, 1024, 16, True, False), (2, 128, 208, 896, 12, False, True),
             (4, 32, 160, 512, 130, False, False), (4, 256, 96, 1024, 64, False, False),
             (2, 64, 256, 512, 200, True, True), (3, 64, 208, 768, 33, False, False)]  # groups of 128 first
    for bits, g, n, k, m, glu, bias in cases:
        pw = rand_pw(n, k, bits, g, glu, bias)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference(x, pw)
        e_dq = rel(gpu_matmul.dequant_matmul(x, pw), ref)
        for cfg in configs:
            small = gpu_matmul.GEMM_CONFIGS[cfg][0] <= gpu_matmul.SPLIT_MAX_ROWS
            for sp in split_counts(cfg, splits, -(-k // 256)):
                for acc in (False, True) if small and not glu else (False,):
                    def run():
                        if not acc:
                            return gpu_matmul.wgmma_gemm(x, pw, cfg, splits=sp)
                        o = torch.ones(m, n, device="cuda")  # out += x W^T on a stream of ones
                        return gpu_matmul.wgmma_gemm(x, pw, cfg, out=o, accumulate=True, splits=sp) - 1
                    try:
                        y = run()
                    except RuntimeError as exc:  # built for one group size only (QLB_GEMM_L2S_ONLY)
                        if "built for log2_spg" not in str(exc):
                            raise
                        print(f"check {v.name} {bits}b g{g} cfg {cfg}: not built", flush=True)
                        break
                    e = rel(y, ref)
                    same = bool(torch.equal(y, run()))
                    good = e <= 1.5 * e_dq + 1e-4 and same
                    ok &= good
                    rows.append({"kind": "check", "variant": v.name, "bits": bits, "group": g, "n": n, "k": k,
                                 "m": m, "glu": glu, "bias": bias, "config": cfg, "splits": sp, "accumulate": acc,
                                 "rel_err": e, "rel_err_dequant_cublas": e_dq, "repeat_equal": same, "ok": good})
                    print(f"check {v.name} {bits}b g{g} n={n} k={k} m={m} glu={glu} bias={bias} cfg {cfg} splits {sp} "
                          f"acc={acc}: {e:.2e} (dequant+cuBLAS {e_dq:.2e}) repeat-equal={same} "
                          f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


def weights(n: int, k: int, bits: int, glu: bool) -> tuple[list, list]:
    """Low-bit and bf16 copies of an [n, k] weight, enough of each to defeat the L2 when cycled."""
    pws = copies(lambda: rand_pw(n, k, bits, glu=glu), 4, n * k * bits // 8)
    return pws, copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 4, n * k * 2)


def rotation():
    """rot(seq): the next of seq's copies on every call (captured into the graph, one per call)."""
    it = {"i": 0}

    def rot(seq):
        it["i"] += 1
        return seq[it["i"] % len(seq)]
    return rot


def bench(rows: list, ms: list[int], configs: list[int], splits: list[int], bits: int,
          variants: list[Variant]) -> None:
    for name, (n, k) in SHAPES.items():
        glu = name == "gate_up"
        pws, dense = weights(n, k, bits, glu)
        steps = pws[0].tiles.shape[1]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rot = rotation()

            def dense_fn():
                y = F.linear(x, rot(dense))
                return gpu_matmul.glu_act(y) if glu else y

            fns = {"cublas_bf16": dense_fn, "dequant_cublas": lambda: gpu_matmul.dequant_matmul(x, rot(pws))}
            plans = {}  # timing key -> (variant, block shape, splits)
            for v in variants:
                with using(v):
                    for cfg in configs:
                        for sp in split_counts(cfg, splits, steps):
                            plans[key(v, cfg, sp)] = (v, cfg, sp)
            for kname, (v, cfg, sp) in plans.items():
                def fn(v=v, cfg=cfg, sp=sp):
                    with using(v):
                        return gpu_matmul.wgmma_gemm(x, rot(pws), cfg, splits=sp)
                fns[kname] = fn
            fns["x_image"] = lambda: gpu_matmul.x_image(x, steps)
            res = {}
            for vname, fn in fns.items():
                try:
                    res[vname] = time_us(fn, calls=10, reps=7)
                except (RuntimeError, ValueError) as e:  # a block shape the device refuses: recorded, skipped
                    res[vname] = None
                    print(f"  {vname}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            best = min((kn for kn in plans if res.get(kn)), key=res.get, default=None)
            if best is not None:  # the best one's kernel alone, x laid out once outside the graph
                v, cfg, sp = plans[best]
                pw = pws[0]
                out = torch.empty(m, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
                e = part = sem = gpu_matmul._empty(x.device)
                if sp > 1:
                    blocks = gpu_matmul._gemm_blocks(m, pw.tiles.shape[0], cfg)
                    part, sem = gpu_matmul._split_workspace(x.device, sp * m * n, blocks)
                xs = gpu_matmul.x_image(x, steps)
                res["wgmma_kernel_only"] = time_us(lambda: v.mod.gemm(xs, pw.tiles, pw.coef, e, out, bits, m, n,
                                                                      pw.log2_spg, glu, cfg, False, sp, part, sem),
                                                   calls=10, reps=7)
            flops = 2 * m * n * k
            row = {"kind": "time", "bits": bits, "shape": name, "n": n, "k": k, "m": m, "us": res, "best": best,
                   "TFLOPs_cublas": flops / res["cublas_bf16"] / 1e6}
            rows.append(row)
            cub = res["cublas_bf16"]
            line = " ".join(f"{v}={t:.1f}" for v, t in res.items() if t)
            print(f"{bits}b {name:8s} M={m:5d}: {line} | bf16/dequant {cub / res['dequant_cublas']:.2f}x"
                  + (f", bf16/{best} {cub / res[best]:.2f}x" if best else ""), flush=True)
        del pws, dense
        torch.cuda.empty_cache()


def bench_decode(rows: list, ms: list[int], configs: list[int], splits: list[int], bits: int,
                 variants: list[Variant]) -> None:
    """Each LLaMA-7B GEMM at decode batch m as the decode step calls it; µs, CUDA-graph replays."""
    for name, (n, k) in SHAPES.items():
        glu, acc = name == "gate_up", name in ("o", "down")
        pws, dense = weights(n, k, bits, glu)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            h = torch.zeros(m, n, device="cuda")
            rot = rotation()

            def dense_fn():
                y = F.linear(x, rot(dense))
                if acc:
                    h.add_(y)
                return gpu_matmul.glu_act(y) if glu else y

            fns = {"cublas_bf16": dense_fn}
            if m <= gpu_matmul.SKINNY_MAX_M:
                fns["skinny"] = lambda: gpu_matmul.gemv(x, rot(pws), out=h if acc else None, accumulate=acc)
            for v in variants:
                for cfg in configs:
                    for sp in splits:
                        def fn(v=v, cfg=cfg, sp=sp):
                            with using(v):
                                return gpu_matmul.wgmma_gemm(x, rot(pws), cfg, out=h if acc else None,
                                                             accumulate=acc, splits=sp)
                        fns[f"{v.name + '.' if v.name else ''}wgmma{cfg}/{sp}"] = fn
            fns["x_image"] = lambda: gpu_matmul.x_image(x, pws[0].tiles.shape[1])
            res = {}
            for vname, fn in fns.items():
                try:
                    res[vname] = time_us(fn, calls=10, reps=7)
                except (RuntimeError, ValueError) as e:  # a shape or split the kernel refuses: recorded, skipped
                    res[vname] = None
                    print(f"  {vname}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            wg = {v: t for v, t in res.items() if "wgmma" in v and t}
            best = min(wg, key=wg.get, default=None)
            plan = gpu_matmul.decode_gemm_plan(m, pws[0])
            rows.append({"kind": "decode", "bits": bits, "shape": name, "n": n, "k": k, "m": m, "us": res,
                         "best": best, "plan": plan})
            cub = res["cublas_bf16"]
            line = " ".join(f"{v}={t:.1f}" for v, t in res.items() if t)
            print(f"{bits}b {name:8s} M={m:3d}: {line} | best {best}"
                  + (f" {cub / wg[best]:.2f}x bf16" if best else "")
                  + (f", skinny {cub / res['skinny']:.2f}x" if res.get("skinny") else "") + f" plan {plan}", flush=True)
        del pws, dense
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--m", default="128,256,512,1024,2048")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--configs", default=",".join(str(c) for c in gpu_matmul.GEMM_CONFIGS))
    ap.add_argument("--splits", default="1", help="K splits to time (blocks of at most SPLIT_MAX_ROWS x rows)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=SOURCE[:DEFINE,...] (see above)")
    ap.add_argument("--decode", default="", help="decode batches to time instead of --m (see above)")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    configs = [int(c) for c in args.configs.split(",")]
    splits = [int(c) for c in args.splits.split(",")]
    rows: list = []
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": rows}
    variants = [parse_variant(spec) for spec in args.variant] or [Variant("", cuda_ext.ext(), {})]
    if not args.skip_check:
        out["check_ok"] = True
        for v in variants:
            with using(v):
                out["check_ok"] &= check(rows, configs, sorted(set(splits) | {1, 3}), v)
    gpu_matmul.WGMMA_MIN_M = 1 << 30  # "skinny" is the GEMV kernel itself
    if args.skip_bench:
        pass
    elif args.decode:
        bench_decode(rows, [int(m) for m in args.decode.split(",")], configs, splits, args.bits, variants)
    else:
        bench(rows, [int(m) for m in args.m.split(",")], configs, splits, args.bits, variants)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
