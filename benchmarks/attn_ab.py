"""The decode attention's launch variants, alone and inside the decode step, in one process (CUDA).

    PYTHONPATH=. python3 benchmarks/attn_ab.py --json OUT.json [--batch 1,8,16,32] [--context 128,1024]

alone: 32 LLaMA-7B layers' attention back to back in one CUDA graph (each layer its own cache, so the caches
do not sit in L2), µs per layer, over context splits x positions per loop step x warps. Every variant's output
is checked against one program per head.
step: synthetic LLaMA-7B INT4 g128 and bf16 cuBLAS decode steps (``time_decode``: graph replays, context 128),
with the shipped rule, with the alone-sweep's best at context 128 for each batch, and with round 10's rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from kernel_sweep import time_us  # noqa: E402

from qalora.bench import time_decode  # noqa: E402
from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels.decoder_triton import attn_block_s, attn_decode, attn_scratch, attn_splits  # noqa: E402

HEADS, DH, LAYERS = 32, 128, 32


def variants() -> list[tuple[int, int, int]]:
    """(splits, block_s, warps)"""
    return [(splits, bs, wp) for splits in (1, 2, 4, 8, 16) for bs in (32, 64, 128) for wp in (2, 4, 8)]


def key(v: tuple) -> str:
    return "/".join(str(x) for x in v)


def alone(batch: int, ctx: int, vs: list[tuple]) -> dict[str, float]:
    s_max = ctx + 72  # time_decode's cache: context + 64 steps + 8
    dev = torch.device("cuda")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, DH, 2, device=dev).float() / DH)
    qkv = torch.randn(batch, 3 * HEADS * DH, device=dev, dtype=torch.bfloat16)
    kcs = [torch.randn(batch, HEADS, s_max, DH, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    vcs = [torch.randn_like(kc) for kc in kcs]
    out = torch.empty(batch, HEADS * DH, device=dev, dtype=torch.bfloat16)
    pos = torch.tensor([ctx], dtype=torch.int32, device=dev)
    attn_decode(qkv, kcs[0], vcs[0], out, pos, inv_freq, HEADS, HEADS)
    ref = out.clone()
    res: dict[str, float] = {}
    for v in vs:
        splits, bs, wp = v
        sc = attn_scratch(batch, HEADS, DH, splits, dev)
        kw = dict(scratch=sc, block_s=bs, num_warps=wp)
        attn_decode(qkv, kcs[0], vcs[0], out, pos, inv_freq, HEADS, HEADS, **kw)
        err = float((out.float() - ref.float()).abs().max())
        if err > 2e-2:
            print(f"  B={batch} ctx={ctx} {key(v)}: WRONG, max error {err:.3g}", flush=True)
            continue

        def run(kw=kw):
            for kc, vc in zip(kcs, vcs):
                attn_decode(qkv, kc, vc, out, pos, inv_freq, HEADS, HEADS, **kw)

        res[key(v)] = time_us(run, calls=1) / LAYERS
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", default="1,8,16,32")
    ap.add_argument("--context", default="128,1024")
    ap.add_argument("--no-step", action="store_true", help="the alone sweep only")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    vs = variants()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "alone": {}, "step": {}}
    best: dict[int, tuple] = {}
    with torch.no_grad():
        for b in batches:
            for ctx in (int(c) for c in args.context.split(",")):
                res = alone(b, ctx, vs)
                auto = attn_splits(b, HEADS, ctx + 72, sms)
                shipped = key((auto, attn_block_s(b * HEADS * auto, ctx + 72, auto, sms), 2))
                top = sorted(res, key=res.get)[:5]
                out["alone"][f"{b}/{ctx}"] = {"us_per_layer": res, "shipped": shipped, "best": top[0]}
                print(f"alone B={b} ctx={ctx}: shipped {shipped} {res[shipped]:.2f} us/layer; best "
                      + ", ".join(f"{k} {res[k]:.2f}" for k in top), flush=True)
                if ctx == 128:
                    best[b] = tuple(top[0].split("/"))
                torch.cuda.empty_cache()
        if not args.no_step:
            src = synthetic_source("llama-7b", 4, 128, torch.device("cuda"), torch.bfloat16)
            for mode in ("lowbit", "dense_cublas"):
                hn = StaticDecoder(src, mode, torch.bfloat16)
                for b in (b for b in batches if b in best):
                    splits, bs, wp = (int(v) for v in best[b])
                    r10 = attn_splits(b, HEADS, 200, sms, chunk=64)  # round 10's rule (time_decode's 200 positions)
                    for name, sc, kw in (("shipped", None, {}), ("best", splits, dict(block_s=bs, num_warps=wp)),
                                         ("round10", r10, dict(block_s=64 if r10 > 1 and 200 > 256 * r10 else 32)),
                                         ("shipped", None, {})):
                        hn.attn_split_count, hn.attn_kw = sc, kw
                        r = time_decode(hn, b, 128, 64, 3)
                        out["step"].setdefault(f"{mode}/{b}/{name}", []).append(r["tokens_per_s"])
                        shape = f"{sc}/{kw['block_s']}/{kw.get('num_warps', 2)}" if sc else ""
                        print(f"step {mode:12s} B={b:<3d} {name:8s} {shape:22s} "
                              f"{r['tokens_per_s']:9.1f} tok/s", flush=True)
                del hn
                torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
