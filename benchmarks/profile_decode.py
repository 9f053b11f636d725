"""Where one decode step's time goes (synthetic LLaMA-7B harness): kernel time per kind of kernel, from
torch.profiler over eager steps, beside the step's CUDA-graph replay time (``qalora.bench.time_decode``).

    PYTHONPATH=. python3 benchmarks/profile_decode.py --cases lowbit:4:1,lowbit:4:8,dense_cublas:16:8 --json OUT.json

A case is ``mode:bits:batch``, or ``mode:bits:pT`` for a batch-1 prefill of T tokens (``time_prefill``); bits are
ignored by the dense modes. ``graph - kernels`` is what the replay spends outside the kernels' own time: launch gaps
and ramps between dependent kernels.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qalora.bench import time_decode, time_prefill
from qalora.decoder import StaticDecoder, synthetic_source

# kernel name fragment -> kind (first match wins)
KINDS = (("gemm_kernel", "wgmma_gemm"), ("x_image", "x_image"), ("dequant", "dequant"), ("lowbit", "gemv"),
         ("gemv", "gemv"), ("attn", "attention"), ("flash", "attention"), ("fmha", "attention"), ("rmsnorm", "rmsnorm"),
         ("silu", "silu_mul"), ("gemm", "cublas"), ("splitK", "cublas"), ("Kernel2", "cublas"), ("nvjet", "cublas"),
         ("argmax", "argmax"), ("reduce", "argmax"), ("index", "embed"), ("copy", "copy"), ("add", "add"))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for frag, k in KINDS if frag.lower() in low), "other")


def eager_profile(hn: StaticDecoder, batch: int, prefill: int = 0, steps: int = 3) -> dict:
    """Mean per-step (or per-prefill of ``prefill`` tokens) kernel µs by kind, kernel count per step, and the
    five costliest kernel names."""
    if prefill:
        hn.alloc(1, prefill)
        ids = torch.randint(0, hn.arch.vocab, (prefill,), device=hn.embed.device)

        def fn() -> None:
            hn.prefill(ids)
    else:
        hn.alloc(batch, 256)
        hn.pos.fill_(128)
        fn = hn.decode_step
    with torch.no_grad():
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
    hn.free()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    count = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA or ev.device_time_total <= 0:
            continue
        by_kind[kind(ev.name)] += ev.device_time_total / steps
        by_name[ev.name[:80]] += ev.device_time_total / steps
        count += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {"kernels_per_step": count / steps, "kernel_us": sum(by_kind.values()),
            "by_kind_us": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), "top_us": dict(top)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="lowbit:4:1,lowbit:4:8,dense_cublas:16:8")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out, decoders = {}, {}
    for case in args.cases.split(","):
        mode, bits, batch = case.split(":")
        key = (mode, 4 if mode != "lowbit" else int(bits))
        if key not in decoders:
            decoders.clear()  # one model resident at a time
            torch.cuda.empty_cache()
            decoders[key] = StaticDecoder(synthetic_source("llama-7b", key[1], 128, dev, torch.bfloat16), mode,
                                          torch.bfloat16)
        hn = decoders[key]
        prefill = int(batch[1:]) if batch.startswith("p") else 0
        with torch.no_grad():
            graph_ms = (time_prefill(hn, prefill, 3) if prefill else
                        time_decode(hn, int(batch), 128, 32, 3)["ms_per_step"])
        r = eager_profile(hn, 1 if prefill else int(batch), prefill)
        r["graph_us"] = graph_ms * 1000
        out[case] = r
        kinds = " ".join(f"{k}={v:.0f}" for k, v in r["by_kind_us"].items())
        print(f"{case:20s} graph {r['graph_us']:.0f} us/step, kernels {r['kernel_us']:.0f} us "
              f"({r['kernels_per_step']:.0f} per step), graph - kernels {r['graph_us'] - r['kernel_us']:.0f} | {kinds}",
              flush=True)
        for name, us in r["top_us"].items():
            print(f"    {us:8.1f} us  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
