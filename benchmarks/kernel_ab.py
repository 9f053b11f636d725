"""A/B of versions of the skinny low-bit kernel (``lowbit_cuda.cu``) in one process, on the same weights.

Each ``--variant NAME=SOURCE[:DEFINE,...]`` is compiled side by side (``cuda_ext.build``); ``SOURCE`` is a
.cu file (``shipped`` = this tree's). Every variant x warps x stages is checked against an fp32
reference, then timed as CUDA-graph replays over weight copies rotated past the L2 (``peers.py``'s
timer), on the LLaMA-7B projection shapes at each M, with torch's tinygemm INT4 on the same weights as the
peer in the same run. Also the fused-RMSNorm and 3-/2-bit paths at M = 1.

    git show a919170:qalora/kernels/lowbit_cuda.cu > .gpu/lowbit_cuda_a919170.cu
    python benchmarks/kernel_ab.py --variant old=.gpu/lowbit_cuda_a919170.cu --variant new=shipped --json $OUT/kernel_ab.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from peers import L2_BYTES, SHAPES, dequant_ref, log, random_weight, rel_err, time_graph, tinygemm  # noqa: E402
from qalora.kernels import cuda_ext  # noqa: E402
from qalora.kernels.prepared import prepare_layer  # noqa: E402
from qalora.lowbit import LowBitLinear  # noqa: E402


def parse_variant(spec: str):
    name, _, rest = spec.partition("=")
    src, _, defs = rest.partition(":")
    path = cuda_ext.SOURCE if src == "shipped" else Path(src)
    return name, cuda_ext.build(path.read_text(), tuple(d for d in defs.split(",") if d))


def prepared(q, s, z, bits: int, group: int):
    n, k = q.shape
    layer = LowBitLinear(k, n, bits, group, device="cuda")
    layer.set_quantized(q, s, z)
    return prepare_layer(layer)


def caller(mod, pw, warps: int, stages: int, norm_weight: torch.Tensor | None):
    """x [M, K] -> bf16 [M, N] through ``mod``'s gemv with this launch (epilogue STORE)."""
    empty = torch.empty(0, dtype=torch.float32, device="cuda")
    nw = empty if norm_weight is None else norm_weight

    def fn(x):
        out = torch.empty(x.shape[0], pw.out_features, device="cuda", dtype=torch.bfloat16)
        mod.gemv(x, nw, pw.tiles, pw.coef, empty, out, pw.bits, pw.out_features, pw.in_features, pw.log2_spg, 0,
                 1e-6, warps, stages, True)
        return out
    return fn


def run_case(variants, shape: str, n: int, k: int, bits: int, group: int, ms, launches, norm: bool, rows: list):
    wbytes = n * k * bits // 8 + 2 * 2 * n * (k // group)
    copies = max(2, -(-3 * L2_BYTES // wbytes))
    weights = [random_weight(n, k, bits, group, seed=c) for c in range(copies)]
    pws = [prepared(*w, bits, group) for w in weights]
    nw = torch.rand(k, device="cuda") + 0.5 if norm else None
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float32 if norm else torch.bfloat16)
        xin = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw if norm else x.float()
        ref = xin @ dequant_ref(*weights[0], group).t()
        if bits == 4 and not norm:
            row = {"shape": shape, "N": n, "K": k, "M": m, "bits": bits, "group": group, "norm": norm,
                   "variant": "tinygemm", "warps": None, "stages": None}
            fns = [tinygemm(*w, group) for w in weights]
            row["rel_err"] = rel_err(fns[0](x), ref)
            us = time_graph(fns, x)
            row.update(us=round(us, 2), tb_s=round((wbytes + m * k * 2 + m * n * 2) / us / 1e6, 3))
            rows.append(row)
            log(json.dumps(row))
        for vname, mod in variants:
            for warps, stages in launches:
                row = {"shape": shape, "N": n, "K": k, "M": m, "bits": bits, "group": group, "norm": norm,
                       "variant": vname, "warps": warps, "stages": stages}
                try:
                    fns = [caller(mod, pw, warps, stages, nw) for pw in pws]
                    row["rel_err"] = rel_err(fns[0](x), ref)
                    if not row["rel_err"] < 2e-2:
                        row["error"] = f"wrong result: rel error {row['rel_err']:.3g}"
                    else:
                        us = time_graph(fns, x)
                        row.update(us=round(us, 2), tb_s=round((wbytes + m * k * 2 + m * n * 2) / us / 1e6, 3))
                except Exception as e:  # a launch the variant refuses (shared memory): say so, go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                log(json.dumps(row))


def summary(rows: list[dict]) -> str:
    """Best launch per (case, variant), and each variant's best against the first variant's best."""
    ok = [r for r in rows if "us" in r]
    key = ("shape", "bits", "group", "norm", "M")  # the group too: the extras rerun qkv at groups 32 and 64
    cases = list(dict.fromkeys(tuple(r[c] for c in key) for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    out = ["| " + " | ".join(key) + " | " + " | ".join(names) + " |", "|---|---|---|---|---|" + "---|" * len(names)]
    for case in cases:
        cells, base = [], None
        for v in names:
            rs = [r for r in ok if tuple(r[c] for c in key) == case and r["variant"] == v]
            if not rs:
                cells.append("–")
                continue
            b = min(rs, key=lambda r: r["us"])
            base = base or b["us"]
            launch = f"w{b['warps']}s{b['stages']}, " if b["warps"] else ""
            cells.append(f"{b['us']:.1f} ({launch}{base / b['us']:.2f}x)")
        out.append("| " + " | ".join(map(str, case)) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME=SOURCE[:DEFINE,...]")
    ap.add_argument("--json", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                    help="also the RMSNorm, 3-/2-bit and group 32/64 cases")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    launches = [(w, s) for w in args.warps for s in args.stages]
    out = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, "argv": sys.argv, "rows": []}
    rows = out["rows"]
    for shape in args.shapes:
        run_case(variants, shape, *SHAPES[shape], 4, args.group, args.m, launches, False, rows)
        Path(args.json).write_text(json.dumps(out, indent=1))
    for shape in args.shapes if args.extras else []:  # the decoder's paths at M = 1: fused RMSNorm, 3 and 2 bit
        run_case(variants, shape, *SHAPES[shape], 4, args.group, [1], launches, True, rows)
        for bits in (3, 2):
            run_case(variants, shape, *SHAPES[shape], bits, args.group, [1], launches, False, rows)
        Path(args.json).write_text(json.dumps(out, indent=1))
    for group in (32, 64) if args.extras else []:  # the coefficient slots at the small groups
        run_case(variants, "qkv", *SHAPES["qkv"], 4, group, [1, 4], launches, False, rows)
    Path(args.json).write_text(json.dumps(out, indent=1))
    log(summary(rows))


if __name__ == "__main__":
    main()
