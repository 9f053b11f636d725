"""Runs one skinny low-bit GEMV shape a few times, for Nsight Compute (CUDA).

    ncu --kernel-name regex:gemv_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        python3 benchmarks/gemv_profile.py --n 12288 --k 4096 --bits 4 --m 1 --norm

``--source FILE[:DEFINE,...]`` profiles another version of ``lowbit_cuda.cu`` (``cuda_ext.build``, GEMV only), e.g. a
timing probe of ``benchmarks/patches/gemv_probe_r14.patch``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from benchmarks.kernel_sweep import rand_pw
from qalora.kernels import cuda_ext, gpu_matmul


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12288)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--stages", type=int, default=None, help="ring slots per warp (default: gpu_matmul.default_stages)")
    ap.add_argument("--norm", action="store_true", help="fp32 residual input with fused RMSNorm (qkv, gate_up)")
    ap.add_argument("--accumulate", action="store_true", help="fp32 out += (o, down)")
    ap.add_argument("--source", default=None, help="FILE[:DEFINE,...]: that lowbit_cuda.cu instead of the shipped one")
    a = ap.parse_args()
    if a.source:  # every kernel call goes through gpu_matmul.ext
        src, _, defs = a.source.partition(":")
        defines = tuple(d for d in defs.split(",") if d)
        gpu_matmul.ext = functools.partial(cuda_ext.build, Path(src).read_text(), defines, with_gemm=False)
    pw = rand_pw(a.n, a.k, a.bits)
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float32 if a.norm else torch.bfloat16)
    nw = torch.rand(a.k, device="cuda") + 0.5 if a.norm else None
    out = torch.zeros(a.m, a.n, device="cuda", dtype=torch.float32) if a.accumulate else None
    for _ in range(6):
        gpu_matmul.gemv(x, pw, out=out, accumulate=a.accumulate, norm_weight=nw, dtype=torch.bfloat16, warps=a.warps,
                        stages=a.stages)
    torch.cuda.synchronize()


if __name__ == "__main__":
    with torch.no_grad():
        main()
