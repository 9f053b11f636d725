"""What bounds the wgmma GEMM at a block shape (CUDA, Hopper): the shipped kernel against a build without its
wgmmas (each behind a test that never holds, so the dequantization still runs) and one without its dequantization
(the A fragments left as they are), on qkv and gate_up (4 bit g128) at decode and prefill rows.

    PYTHONPATH=. python3 benchmarks/gemm_parts.py [OUT.json]

The two variants are built from ``lowbit_gemm.cu``'s text for groups of 128 only (``QLB_GEMM_L2S_ONLY``).
Timings as ``gemm_ab.py`` (CUDA-graph replays over weight copies rotated past L2, µs), the kernel alone
(x's image made once).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import qalora.kernels.cuda_ext as ce  # noqa: E402
from kernel_sweep import SHAPES, copies, rand_pw, time_us  # noqa: E402
from qalora.kernels import gpu_matmul  # noqa: E402

CALL = "Wgmma<BN>::template run<T>(acc, av[q], desc_sw128(xb + (q >> 2) * BN * 128 + (q & 3) * 32));"
DEQUANT = "dequant_block<T, BITS, KBS, L2S>(w, cf, ((kbl + 1) % KBPS) * KBS, av[(kbl + 1) & 1]);"
CASES = ((8, 4), (32, 4), (64, 5), (256, 3))  # (x rows, block shape)


def variants() -> dict[str, str]:
    g = ce.GEMM_SOURCE.read_text()
    if CALL not in g or DEQUANT not in g:
        raise SystemExit("lowbit_gemm.cu changed: update CALL / DEQUANT")
    return {"shipped": g, "no_mma": g.replace(CALL, "if (av[q][0] == 0xFFFFFFFFu && av[q][1] == 0x12345u) " + CALL),
            "no_dequant": g.replace(DEQUANT, "")}


def main() -> None:
    mods = {k: ce.build(ce.SOURCE.read_text(), ("QLB_GEMM_L2S_ONLY=2",), v) for k, v in variants().items()}
    res = {}
    for name in ("qkv", "gate_up"):
        n, k = SHAPES[name]
        glu = name == "gate_up"
        pws = copies(lambda: rand_pw(n, k, 4, glu=glu), 4, n * k // 2)
        for m, cfg in CASES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = gpu_matmul.x_image(x, pws[0].tiles.shape[1])
            out = torch.empty(m, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
            e = gpu_matmul._empty(x.device)
            it = {"i": 0}
            for vn, mod in mods.items():
                def fn(mod=mod):
                    it["i"] += 1
                    pw = pws[it["i"] % len(pws)]
                    mod.gemm(xs, pw.tiles, pw.coef, e, out, 4, m, n, pw.log2_spg, glu, cfg, False, 1, e, e)
                res[f"{name}/{m}/{vn}"] = t = time_us(fn, calls=10, reps=7)
                print(f"{name:8s} M={m:4d} cfg {cfg} {vn:10s} {t:7.1f} us", flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(), "us": res}, indent=1))


if __name__ == "__main__":
    main()
