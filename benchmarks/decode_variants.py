"""Decode A/B of versions of ``lowbit_cuda.cu`` in one process, in alternating order (CUDA).

    PYTHONPATH=. python3 benchmarks/decode_variants.py OUT.json 4,2 1,2,8,16 head=qalora/kernels/lowbit_cuda.cu \
        xaddr=other.cu chains2=chains.cu:QLB_CHAINS=2

Arguments: the JSON to write, bit widths, decode batches, then ``NAME=SOURCE[:DEFINE,...]`` per variant, as
``kernel_ab.py`` reads it (``shipped`` = this tree's source; its pseudo-defines do nothing here), plus pseudo-defines
``@NAME=INT`` that set ``gpu_matmul.NAME`` while that variant decodes (launch defaults such as ``@MANY_TILES=100000``:
8 warps for every weight, ``default_warps``; ``@DEFAULT_STAGES=3``). Each variant is built
GEMV-only (``cuda_ext.build(..., with_gemm=False)``), so batches must stay below
``gpu_matmul.WGMMA_MIN_M`` (17: the decoder runs the wgmma GEMM from 17 rows), unless every SOURCE names a version of
``lowbit_gemm.cu`` too, ``CUDA+GEMM`` (either may be ``shipped``; the defines go to both):

    PYTHONPATH=. python3 benchmarks/decode_variants.py OUT.json 4 16,32 head=shipped+shipped \
        ws2=shipped+ws.cu:QLB_GEMM_WS=2

Per bit width one
synthetic LLaMA-7B (group 128, bf16) is decoded by every variant in two passes, the second in reverse order, so
a drift over the run shows as a difference between passes, not between variants. The harness is
``decode_ab.run`` (CUDA-graph replays, context 128, 64 steps, median of 5). Tokens/s per run go to the JSON,
rewritten after each run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from decode_ab import run  # noqa: E402
from kernel_ab import launch_knobs, parse_variant  # noqa: E402

from qalora.decoder import StaticDecoder, synthetic_source  # noqa: E402
from qalora.kernels import cuda_ext, gpu_matmul  # noqa: E402


def main(out_path: str, bits_list: list[int], batches: list[int], specs: list[str]) -> None:
    mods, knobs = {}, {}
    for spec in specs:
        path, _, defs = spec.partition(":")
        defines, kn = launch_knobs(spec, [d for d in defs.split(",") if d])
        path, _, gemm = path.partition("+")
        if max(batches) >= gpu_matmul.WGMMA_MIN_M and not gemm:
            raise SystemExit(f"{spec}: batches {batches} reach gpu_matmul.WGMMA_MIN_M = {gpu_matmul.WGMMA_MIN_M}, "
                             "where the decoder runs the wgmma GEMM: name its source too, NAME=CUDA+GEMM")
        if gemm:
            name, _, cuda = path.partition("=")
            csrc = {"shipped": cuda_ext.SOURCE}.get(cuda, Path(cuda)).read_text()
            gsrc = {"shipped": cuda_ext.GEMM_SOURCE}.get(gemm, Path(gemm)).read_text()
            mods[name] = cuda_ext.build(csrc, defines, gemm_src=gsrc)
        else:
            name, (mods[name], _pdl, _check) = parse_variant(path + ":" + ",".join(defines))
        knobs[name] = kn
    defaults = {key: getattr(gpu_matmul, key) for kn in knobs.values() for key in kn}
    out: dict = {"device": torch.cuda.get_device_name(), "argv": sys.argv, "runs": []}
    for bits in bits_list:
        src = synthetic_source("llama-7b", bits, 128, torch.device("cuda"), torch.bfloat16)
        hn = StaticDecoder(src, "lowbit", torch.bfloat16)
        for p in range(2):
            for name in list(mods) if p == 0 else list(mods)[::-1]:
                gpu_matmul.ext = lambda m=mods[name]: m  # every kernel call goes through gpu_matmul.ext
                for key, v in {**defaults, **knobs[name]}.items():
                    setattr(gpu_matmul, key, v)
                r = run(hn, batches, [], (), 5, ["split"], [gpu_matmul.WGMMA_MIN_M])
                out["runs"].append({"bits": bits, "pass": p, "variant": name, "decode": r["decode"]})
                print(bits, p, name, {k: round(v["tokens_per_s"], 1) for k, v in r["decode"].items()}, flush=True)
                Path(out_path).write_text(json.dumps(out, indent=1))
        del hn, src
        torch.cuda.empty_cache()


if __name__ == "__main__":
    with torch.no_grad():
        ints = [[int(b) for b in arg.split(",")] for arg in sys.argv[2:4]]
        main(sys.argv[1], *ints, sys.argv[4:])
