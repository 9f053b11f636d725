"""A/B of versions of the skinny low-bit kernel (``lowbit_cuda.cu``) in one process, on the same weights.

Each ``--variant NAME=SOURCE[:DEFINE,...]`` is compiled side by side (``cuda_ext.build``); ``SOURCE`` is a
.cu file (``shipped`` = this tree's); the pseudo-define ``PDL=0`` makes its launches plain instead of
programmatic dependent ones (``gpu_matmul.gemv``'s ``pdl``). Every variant x warps x stages is checked against an fp32
reference (a variant with the pseudo-define ``CHECK=0``, a timing probe that leaves out part of the work, is timed
whatever its result), then timed as CUDA-graph replays over weight copies rotated past the L2 (``peers.py``'s
timer), on the LLaMA-7B projection shapes at each M, with torch's tinygemm INT4 on the same weights as the
peer in the same run. Also the fused-RMSNorm and 3-/2-bit paths at M = 1.

    git apply benchmarks/patches/gemv_steploop_r13.patch && cp qalora/kernels/lowbit_cuda.cu .gpu/steploop.cu && git checkout qalora/kernels/lowbit_cuda.cu
    python benchmarks/kernel_ab.py --variant steploop=.gpu/steploop.cu --variant shipped=shipped --json $OUT/kernel_ab.json

A SOURCE must have the launchers' interface of round 14 (``char* err`` and the next-norm tensors, ``cuda_ext.BINDING``):
older versions of the file no longer link against the binding.

``--chain L`` also times L LLaMA-7B layers' GEMVs back to back in one CUDA graph (fused-norm qkv, o into the
residual, fused-norm gate|up with SiLU*up, down into the residual; no attention) per variant, checking
each variant's residual stream against the first's: the kernel boundaries a decode step has.
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
from qalora.kernels.gpu_matmul import _empty, default_warps, stages_x  # noqa: E402
from qalora.kernels.prepared import prepare_layer  # noqa: E402
from qalora.lowbit import LowBitLinear  # noqa: E402


def launch_knobs(spec: str, defines: list[str]) -> tuple[tuple[str, ...], dict[str, int]]:
    """A variant's ``-D`` defines and its pseudo-defines ``@NAME=INT``: ``gpu_matmul`` integers to set while that
    variant runs (launch defaults such as ``@DEFAULT_STAGES=3``); exits naming ``spec`` on an unknown name."""
    from qalora.kernels import gpu_matmul

    knobs = {}
    for d in defines:
        if d.startswith("@"):
            key, _, v = d[1:].partition("=")
            if not isinstance(getattr(gpu_matmul, key, None), int) or not v.lstrip("-").isdigit():
                raise SystemExit(f"{spec}: {d} must be @NAME=INT with NAME an integer of gpu_matmul")
            knobs[key] = int(v)
    return tuple(d for d in defines if not d.startswith("@")), knobs


def parse_variant(spec: str):
    """NAME=SOURCE[:DEFINE,...] -> (name, (module, pdl, check))."""
    name, _, rest = spec.partition("=")
    src, _, defs = rest.partition(":")
    path = cuda_ext.SOURCE if src == "shipped" else Path(src)
    defines = [d for d in defs.split(",") if d]
    pdl, check = "PDL=0" not in defines, "CHECK=0" not in defines
    defines = tuple(d for d in defines if d not in ("PDL=0", "CHECK=0"))
    return name, (cuda_ext.build(path.read_text(), defines, with_gemm=False), pdl, check)


def prepared(q, s, z, bits: int, group: int):
    n, k = q.shape
    layer = LowBitLinear(k, n, bits, group, device="cuda")
    layer.set_quantized(q, s, z)
    return prepare_layer(layer)


DTYPE = torch.bfloat16  # compute dtype (--dtype)


def call(variant, x, pw, out, epi: int, norm_weight, warps: int, stages: int) -> torch.Tensor:
    """``variant``'s gemv of x [M, K] into ``out`` (epilogue ``epi``, DTYPE compute)."""
    mod, pdl, _ = variant
    empty = _empty(x.device)  # no norm weight / no bias
    mod.gemv(x, empty if norm_weight is None else norm_weight, pw.tiles, pw.coef, empty, out, *[empty] * 4, pw.bits,
             pw.out_features, pw.in_features, pw.log2_spg, epi, 1e-6, warps, stages, DTYPE == torch.bfloat16, pdl)
    return out


def caller(variant, pw, warps: int, stages: int, norm_weight: torch.Tensor | None):
    """x [M, K] -> DTYPE [M, N] through ``variant``'s gemv with this launch (epilogue STORE)."""
    def fn(x):
        out = torch.empty(x.shape[0], pw.out_features, device="cuda", dtype=DTYPE)
        return call(variant, x, pw, out, 0, norm_weight, warps, stages)
    return fn


def run_case(variants, shape: str, n: int, k: int, bits: int, group: int, ms, launches, norm: bool, rows: list):
    wbytes = n * k * bits // 8 + 2 * 2 * n * (k // group)
    copies = max(2, -(-3 * L2_BYTES // wbytes))
    weights = [random_weight(n, k, bits, group, seed=c) for c in range(copies)]
    pws = [prepared(*w, bits, group) for w in weights]
    nw = torch.rand(k, device="cuda") + 0.5 if norm else None
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float32 if norm else DTYPE)
        xin = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw if norm else x.float()
        ref = xin @ dequant_ref(*weights[0], group).t()
        if bits == 4 and not norm and DTYPE == torch.bfloat16:  # tinygemm takes bf16
            row = {"shape": shape, "N": n, "K": k, "M": m, "bits": bits, "group": group, "norm": norm,
                   "variant": "tinygemm", "warps": None, "stages": None}
            fns = [tinygemm(*w, group) for w in weights]
            row["rel_err"] = rel_err(fns[0](x), ref)
            us = time_graph(fns, x)
            row.update(us=round(us, 2), tb_s=round((wbytes + m * k * 2 + m * n * 2) / us / 1e6, 3))
            rows.append(row)
            log(json.dumps(row))
        for vname, variant in variants:
            for warps, stages in launches:
                row = {"shape": shape, "N": n, "K": k, "M": m, "bits": bits, "group": group, "norm": norm,
                       "variant": vname, "warps": warps, "stages": stages}
                try:
                    fns = [caller(variant, pw, warps, stages, nw) for pw in pws]
                    y = fns[0](x)
                    row["rel_err"] = rel_err(y, ref)
                    row["repeat_equal"] = bool(torch.equal(y, fns[0](x)))
                    if variant[2] and not row["rel_err"] < 2e-2:
                        row["error"] = f"wrong result: rel error {row['rel_err']:.3g}"
                    else:
                        us = time_graph(fns, x)
                        row.update(us=round(us, 2), tb_s=round((wbytes + m * k * 2 + m * n * 2) / us / 1e6, 3))
                except Exception as e:  # a launch the variant refuses (shared memory): say so, go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                log(json.dumps(row))


def chain_layers(n_layers: int) -> list[dict]:
    """Random 4-bit g128 LLaMA-7B layers: prepared qkv / o / gate_up (glu) / down and two norm weights."""
    from qalora.decoder import _rand_canon
    from qalora.kernels.prepared import prepare_weight

    d, f = SHAPES["o"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(n_layers):
        lay = {"ln1": torch.rand(d, device="cuda") + 0.5, "ln2": torch.rand(d, device="cuda") + 0.5}
        for key, (n, k) in SHAPES.items():
            c = _rand_canon(n, k, 4, 128, torch.device("cuda"), gen)
            lay[key] = prepare_weight(c.qweight, c.scales, c.zeros, 4, 128, k, glu=key == "gate_up")
            lay[key].drop_canonical()
        layers.append(lay)
    return layers


def run_chain(variants, layers: list[dict], ms, stages_list, rows: list) -> None:
    """Each variant's GEMVs of ``layers`` back to back in one CUDA graph (µs per layer), and its residual
    stream after one pass against the first variant's (a dependent launch that raced would differ)."""
    from qalora.kernels.decoder_triton import rmsnorm

    d, f = SHAPES["o"][0], SHAPES["down"][1]
    for m in ms:
        gen = torch.Generator(device="cuda").manual_seed(m)
        h0 = torch.randn(m, d, device="cuda", generator=gen)
        attn = torch.randn(m, d, device="cuda", generator=gen).bfloat16()
        first = None
        for vname, variant in variants:
            for stages in stages_list:
                h = h0.clone()
                qkv = torch.empty(m, SHAPES["qkv"][0], device="cuda", dtype=torch.bfloat16)
                act = torch.empty(m, f, device="cuda", dtype=torch.bfloat16)
                xn = torch.empty(m, d, device="cuda", dtype=torch.bfloat16)

                def normed(w, nw, out, epi):
                    if stages_x(m, d):
                        return call(variant, h, w, out, epi, nw, default_warps(w), stages)
                    return call(variant, rmsnorm(h, nw, 1e-6, xn), w, out, epi, None, default_warps(w), stages)

                def step(_=None):
                    for lay in layers:
                        normed(lay["qkv"], lay["ln1"], qkv, 0)
                        call(variant, attn, lay["o"], h, 1, None, default_warps(lay["o"]), stages)
                        normed(lay["gate_up"], lay["ln2"], act, 2)
                        call(variant, act, lay["down"], h, 1, None, default_warps(lay["down"]), stages)

                row = {"chain": len(layers), "M": m, "variant": vname, "stages": stages}
                step()
                torch.cuda.synchronize()
                if first is None:
                    first = h.clone()
                row["rel_err_vs_first"] = rel_err(h, first)
                us = time_graph([step], h) / len(layers)  # h is only the timer's argument here
                row["us_per_layer"] = round(us, 2)
                rows.append(row)
                log(json.dumps(row))


def summary(rows: list[dict]) -> str:
    """Best launch per (case, variant), and each variant's best against the first variant's best."""
    ok = [r for r in rows if "us" in r]
    chain = [r for r in rows if "chain" in r]
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
    for r in chain:
        out.append(f"chain M={r['M']} {r['variant']} s{r['stages']}: {r['us_per_layer']} us/layer "
                   f"(residual rel. diff to first {r['rel_err_vs_first']:.2e})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME=SOURCE[:DEFINE,...]")
    ap.add_argument("--json", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="none: only the chain")
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                    help="also the RMSNorm, 3-/2-bit and group 32/64 cases")
    ap.add_argument("--chain", type=int, default=0, help="layers of the back-to-back GEMV chain (0: none)")
    ap.add_argument("--chain-m", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="compute dtype of the per-GEMV cases")
    args = ap.parse_args()
    global DTYPE
    DTYPE = torch.float16 if args.dtype == "fp16" else torch.bfloat16
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
    if args.chain:
        run_chain(variants, chain_layers(args.chain), args.chain_m, args.stages, rows)
    Path(args.json).write_text(json.dumps(out, indent=1))
    log(summary(rows))


if __name__ == "__main__":
    main()
