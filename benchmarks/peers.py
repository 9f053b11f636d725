"""Low-bit matmul per GEMV/GEMM against the peers, one process, one GPU, the same weights and inputs.

For the four LLaMA-7B projection shapes (N x K) and M rows of bf16 activations, 4-bit g128 weights with
float zeros (W = s * (q - z)), each kernel is first checked against an fp32 reference on fresh random
data, then timed as CUDA-graph replays over enough weight copies to rotate past the L2:

- ``ours``: ``qalora.kernels.gpu_matmul`` (the skinny kernel up to 32 rows, dequant + cuBLAS above), at its
  default launch and at each ``--warps`` x ``--stages`` (M <= 32), as a plain launch; ``ours+pdl`` as a
  programmatic dependent launch, the decoder's default: each call then overlaps the one before it in the
  timer's graph, as consecutive GEMVs of a decode step do (a figure for back-to-back calls, not one call);
- ``tinygemm``: torch's ``_weight_int4pack_mm`` (the same weights: zero = s * (8 - z) in its convention);
- ``gemlite``: GemLite's A16W4 HQQ-INT Triton kernels (the same W = s * (q - z)), its packaged H100 configs;
- ``cublas``: ``F.linear`` on the same weights dequantized to bf16.

Achieved bandwidth counts the bytes each must move at least: 4-bit codes, bf16 scale and zero per group,
x and y (bf16 weights for cuBLAS). Also ours at 3 and 2 bit at M = 1 (their own bytes).

    python benchmarks/peers.py --json $OUT/peers_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
L2_BYTES = 50 * 2 ** 20


def log(*a) -> None:
    print(*a, flush=True)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def random_weight(n: int, k: int, bits: int, group: int, seed: int):
    """codes [N, K] int, scales and zeros [N, K/g] fp32 (zeros fractional: float zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), device="cuda", generator=g, dtype=torch.int32)
    s = (torch.rand(n, k // group, device="cuda", generator=g) * 0.02 + 0.005)
    z = torch.rand(n, k // group, device="cuda", generator=g) * (2 ** bits - 1)
    # bf16-representable, so that every kernel (bf16 scale/zero storage) sees the same numbers
    return q, s.bfloat16().float(), z.bfloat16().float()


def dequant_ref(q, s, z, group: int) -> torch.Tensor:
    return (q.float() - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)


class Kernel:
    """One implementation for one (shape, bits): a callable on x [M, K] and its bytes per weight copy."""

    def __init__(self, name: str, fn, weight_bytes: int):
        self.name, self.fn, self.weight_bytes = name, fn, weight_bytes


def ours(q, s, z, bits: int, group: int, warps: int | None = None, stages: int | None = None, pdl: bool = False):
    """(``pdl`` off by default: with it, back-to-back calls of the timer's graph overlap, which no peer does.)"""
    from qalora.kernels import gpu_matmul
    from qalora.kernels.prepared import prepare_layer
    from qalora.lowbit import LowBitLinear

    n, k = q.shape
    layer = LowBitLinear(k, n, bits, group, device="cuda")
    layer.set_quantized(q, s, z)
    pw = prepare_layer(layer)

    def fn(x):
        if x.shape[0] <= gpu_matmul.SKINNY_MAX_M:
            return gpu_matmul.gemv(x, pw, warps=warps, stages=stages, pdl=pdl)
        return gpu_matmul.matmul(x, pw)
    return fn


def tinygemm_pack(q, s, z) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's tinygemm INT4 operands of codes q [N, K] (int) and fp32 scales / float zeros [N, K/g]: the packed
    weight and bf16 [K/g, N, 2] (scale, zero), its zero being s (8 - z)."""
    packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    sz = torch.stack([s.t(), (s * (8 - z)).t()], dim=-1).contiguous().bfloat16()
    return torch._convert_weight_to_int4pack(packed_u8, 8), sz


def tinygemm(q, s, z, group: int):
    packed, sz = tinygemm_pack(q, s, z)
    return lambda x: torch._weight_int4pack_mm(x, packed, group, sz)


def gemlite(q, s, z, group: int):
    import gemlite

    layer = gemlite.helper.A16W4_HQQ_INT(device="cuda:0", dtype=torch.bfloat16).from_weights(
        W_q=q.to(torch.uint8), scales=s.bfloat16(), zeros=z.bfloat16())
    return lambda x: layer(x)


def cublas(q, s, z, group: int):
    w = dequant_ref(q, s, z, group).bfloat16()
    return lambda x: F.linear(x, w)


def time_graph(fns: list, x: torch.Tensor, reps: int = 20) -> float:
    """µs per call: one CUDA graph calling each of ``fns`` (weight copies) in turn, replayed ``reps`` times."""
    for f in fns:
        f(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f(x)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(fns))
    times.sort()
    return times[len(times) // 2]


def bench_shape(name: str, n: int, k: int, ms: list[int], args, rows: list) -> None:
    group = args.group
    builders = {"ours": lambda q, s, z: ours(q, s, z, 4, group),
                "ours+pdl": lambda q, s, z: ours(q, s, z, 4, group, pdl=True),
                "tinygemm": lambda q, s, z: tinygemm(q, s, z, group),
                "gemlite": lambda q, s, z: gemlite(q, s, z, group), "cublas": lambda q, s, z: cublas(q, s, z, group)}
    for w in args.warps:
        for st in args.stages:
            builders[f"ours[w{w},s{st}]"] = (lambda w_, s_: lambda q, s, z: ours(q, s, z, 4, group, w_, s_))(w, st)
    lowbit_bytes = n * k // 2 + 2 * 2 * n * (k // group)
    for kname, build in builders.items():
        if kname.startswith("ours[") and not args.variants_on.get(name):
            continue
        dense = kname == "cublas"
        wbytes = n * k * 2 if dense else lowbit_bytes
        copies = max(2, -(-3 * L2_BYTES // wbytes))
        try:
            weights = [random_weight(n, k, 4, group, seed=c) for c in range(copies)]
            t0 = time.perf_counter()
            fns = [build(*w) for w in weights]
            setup_s = time.perf_counter() - t0
        except Exception as e:  # a peer that does not take this shape: say so, go on
            rows.append({"shape": name, "kernel": kname, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"{name} {kname}: setup failed: {e}")
            continue
        for m in ms:
            if kname.startswith("ours[") and m > 32:
                continue
            row = {"shape": name, "N": n, "K": k, "M": m, "kernel": kname}
            try:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ dequant_ref(*weights[0], group).t()
                y = fns[0](x)
                row["rel_err"] = rel_err(y, ref)
                if not row["rel_err"] < 2e-2:
                    row["error"] = f"wrong result: rel error {row['rel_err']:.3g}"
                else:
                    us = time_graph(fns, x)
                    moved = wbytes + m * k * 2 + m * n * 2
                    row.update(us=round(us, 2), tb_s=round(moved / us / 1e6, 3))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            if kname == "gemlite" and m == ms[0]:
                row["setup_s"] = round(setup_s, 1)
            rows.append(row)
            log(json.dumps(row))
        del fns, weights
        torch.cuda.empty_cache()


def bench_lowbits(args, rows: list) -> None:
    """Ours at 3 and 2 bit, M = 1: their own bytes (the floors the decode targets are stated against)."""
    for bits in (3, 2):
        for name, (n, k) in SHAPES.items():
            wbytes = n * k * bits // 8 + 2 * 2 * n * (k // args.group)
            copies = max(2, -(-3 * L2_BYTES // wbytes))
            weights = [random_weight(n, k, bits, args.group, seed=c) for c in range(copies)]
            fns = [ours(*w, bits, args.group) for w in weights]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dequant_ref(*weights[0], args.group).t()
            row = {"shape": name, "N": n, "K": k, "M": 1, "kernel": f"ours.int{bits}", "rel_err": rel_err(fns[0](x), ref)}
            us = time_graph(fns, x)
            row.update(us=round(us, 2), tb_s=round((wbytes + 2 * k + 2 * n) / us / 1e6, 3))
            rows.append(row)
            log(json.dumps(row))


def copy_bandwidth() -> float:
    """TB/s of a 2 GB device-to-device copy (bytes read + written), the ceiling."""
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    e1.synchronize()
    return 2 * a.numel() * 10 / (e0.elapsed_time(e1) / 1000) / 1e12


def table(rows: list[dict]) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows if not r["kernel"].startswith("ours[")))
    out = ["| shape | M | " + " | ".join(kernels) + " |", "|---|---|" + "---|" * len(kernels)]
    keys = list(dict.fromkeys((r["shape"], r.get("M")) for r in rows if r.get("M") is not None))
    for shape, m in keys:
        cells = []
        for kname in kernels:
            r = next((r for r in rows if r["shape"] == shape and r.get("M") == m and r["kernel"] == kname), None)
            cells.append("–" if r is None else (f"{r['us']:.1f} µs, {r['tb_s']:.2f} TB/s" if "us" in r else "err"))
        out.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 32, 512, 2048])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--warps", type=int, nargs="*", default=[2, 4, 8], help="ours' launch variants (M <= 32)")
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--variants-shapes", nargs="*", default=["qkv", "o"], help="shapes the launch variants run on")
    ap.add_argument("--no-lowbits", action="store_true")
    args = ap.parse_args()
    args.variants_on = {s: s in args.variants_shapes for s in SHAPES}
    try:
        import gemlite

        cfg = Path(gemlite.__file__).with_name("configs") / "h100.json"  # the H200 is the H100's chip
        gemlite.load_config(str(cfg)) if cfg.is_file() else None
        gl_version = getattr(gemlite, "__version__", "?")
    except ImportError as e:
        gl_version = f"not importable: {e}"
    out = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                   "gemlite": gl_version}, "argv": sys.argv, "rows": []}
    out["env"]["copy_tb_s"] = round(copy_bandwidth(), 3)
    log(json.dumps(out["env"]))
    for name in args.shapes:
        n, k = SHAPES[name]
        bench_shape(name, n, k, args.m, args, out["rows"])
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.no_lowbits:
        bench_lowbits(args, out["rows"])
    Path(args.json).write_text(json.dumps(out, indent=1))
    log(table(out["rows"]))
    variants = [r for r in out["rows"] if r["kernel"].startswith("ours[") and "us" in r]
    for shape, m in dict.fromkeys((r["shape"], r["M"]) for r in variants):
        best = min((r for r in variants if (r["shape"], r["M"]) == (shape, m)), key=lambda r: r["us"])
        log(f"best launch {shape} M={m}: {best['kernel']} {best['us']} µs")


if __name__ == "__main__":
    main()
