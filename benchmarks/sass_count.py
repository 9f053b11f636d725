"""Instructions per K step of the skinny low-bit kernel, from its SASS: no GPU needed, only nvcc.

The M = 1 kernel is bound by instruction issue (benchmarks/RESULTS.md, round 4), so the SASS
instructions in its step loop are a first, free measure of a change before any GPU time is spent.
For each case (dtype, bits, n8 fragments NT, fused norm, staged x, tiles per block R; and the large-M
wgmma GEMM of ``lowbit_gemm.cu``, whose loop is one 256-column step per warp, counted without the
code its one copy-issuing thread runs alone) this compiles
the kernel for sm_90a, disassembles it and reports registers, spills, and the instructions of its
main loop (the innermost backward branch around all the ``HMMA``), with the most frequent opcodes.
The cases are at group 128, which the launcher compiles in up to 16 rows: there the loop is straight
code, its static count what one step runs. At 32 rows (group size read at run time) the group
epilogue is compiled into every span but runs twice per step, so it is counted 8 times.

    python benchmarks/sass_count.py                       # the shipped kernel
    python benchmarks/sass_count.py --source old.cu --define QLB_R_SX=1 --json out.json

``cuobjdump`` comes from the CUDA toolkit or, without one, from Triton's wheel
(``triton/backends/nvidia/bin``; ``pip download triton`` and unzip that folder, then pass ``--cuobjdump``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "qalora" / "kernels" / "lowbit_cuda.cu"
GEMM_SOURCE = ROOT / "qalora" / "kernels" / "lowbit_gemm.cu"
# (name, T, BITS, NT, NORM, SX, R): the decoder's M = 1 paths (staged x, fused norm or not), M = 8 and 16 (x read
# from global memory: decode batches 8 and 16), M = 32;
# two tiles per block as round 5 shipped them, and the one tile 4 bit ships at M <= 4 (".r1", bf16 and fp16)
CASES = [
    ("m1.norm.int4", "__nv_bfloat16", 4, 1, "true", "true", 2),
    ("m1.int4", "__nv_bfloat16", 4, 1, "false", "true", 2),
    ("m1.int4.r1", "__nv_bfloat16", 4, 1, "false", "true", 1),
    ("m1.norm.int4.r1", "__nv_bfloat16", 4, 1, "true", "true", 1),
    ("m1.f16.int4.r1", "__half", 4, 1, "false", "true", 1),
    ("m1.int3", "__nv_bfloat16", 3, 1, "false", "true", 2),
    ("m1.int2", "__nv_bfloat16", 2, 1, "false", "true", 2),
    ("m1.norm.int3", "__nv_bfloat16", 3, 1, "true", "true", 2),
    ("m1.norm.int2", "__nv_bfloat16", 2, 1, "true", "true", 2),
    ("m8.int4", "__nv_bfloat16", 4, 1, "false", "false", 2),
    ("m8.int2", "__nv_bfloat16", 2, 1, "false", "false", 2),
    ("m8.int3", "__nv_bfloat16", 3, 1, "false", "false", 2),
    ("m16.int4", "__nv_bfloat16", 4, 2, "false", "false", 2),
    ("m16.int2", "__nv_bfloat16", 2, 2, "false", "false", 2),
    ("m8.f16.int4", "__half", 4, 1, "false", "false", 2),
    ("m32.int4", "__nv_bfloat16", 4, 4, "false", "false", 2),
]


# the wgmma GEMM (lowbit_gemm.cu): (name, kernel, T, BITS, BN, WG, KBS, NS, CS, WS, L2S), groups of 128;
# its loop is one 256-column step (16 slabs of 16 columns) per warp. WS (copy warps, round 19) is left out of
# the template arguments for sources before it, whose kernels have none: the WS = 0 cases then count the same
GEMM_CASES = [
    ("gemm.int4.bn256", "gemm_kernel", "__nv_bfloat16", 4, 256, 2, 4, 4, 2, 0, 2),
    ("gemm.int4.bn128", "gemm_kernel", "__nv_bfloat16", 4, 128, 2, 8, 4, 2, 1, 2),
    ("gemm.int3.bn256", "gemm_kernel", "__nv_bfloat16", 3, 256, 2, 4, 4, 2, 0, 2),
    ("gemm.int2.bn256", "gemm_kernel", "__nv_bfloat16", 2, 256, 2, 4, 4, 2, 0, 2),
    ("gemm.int4.bn32", "gemm_kernel", "__nv_bfloat16", 4, 32, 1, 8, 4, 4, 2, 2),
]


def gemm_args(gemm_src: Path, case: tuple) -> list[int]:
    """A GEMM case's integer template arguments as ``gemm_src``'s kernel takes them."""
    *shape, ws, l2s = case[3:]
    return [*shape, ws, l2s] if "int WS, int L2S" in gemm_src.read_text() else [*shape, l2s]


def group_log2(nt: int) -> int:
    """The kernel's GS at groups of 128: compiled in (4 spans) up to 16 rows, read at run time above."""
    return 2 if nt < 4 else -1


INSN = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
FUNC = re.compile(r"Function : (\S+)")


def tool(name: str, given: str | None) -> str:
    path = given or shutil.which(name)
    if not path:
        sys.exit(f"{name} not found: put it on PATH or pass --{name}")
    return path


def compile_cases(src: Path, gemm_src: Path, defines: list[str], nvcc: str, work: Path) -> tuple[Path, str]:
    """One cubin holding every case's kernel (taking each one's address instantiates it)."""
    ptrs = [f"(const void*)&qlb::gemv_kernel<{t}, {b}, {nt}, {norm}, {sx}, {r}, {group_log2(nt)}>"
            for _, t, b, nt, norm, sx, r in CASES]
    ptrs += [f"(const void*)&qlb::{c[1]}<{c[2]}, {', '.join(map(str, gemm_args(gemm_src, c)))}>" for c in GEMM_CASES]
    tu = work / "cases.cu"
    tu.write_text(f'#include "{src.resolve()}"\n#include "{gemm_src.resolve()}"\n'
                  f'const void* qlb_cases[] = {{{", ".join(ptrs)}}};\n')
    cubin = work / "cases.cubin"
    cmd = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-cubin", "-Xptxas", "-v",
           *(f"-D{d}" for d in defines), str(tu), "-o", str(cubin)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"nvcc failed:\n{done.stderr[-3000:]}")
    return cubin, done.stderr


def ptxas_report(log: str) -> dict[str, dict]:
    """mangled kernel name -> registers and spill bytes, from ``-Xptxas -v``."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
        elif name and "spill stores" in line:
            nums = [int(x) for x in re.findall(r"(\d+) bytes", line)]
            out[name].update(stack=nums[0], spill_stores=nums[1], spill_loads=nums[2])
        elif name and "Used" in line and "registers" in line:
            out[name]["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
    return out


def branch_target(text: str) -> int | None:
    m = re.search(r"BRA (?:!?U?P\w+, )?0x([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def step_loop(insns: list[tuple[int, str]], mma: str = "HMMA") -> list[tuple[int, str]]:
    """The instructions of the innermost loop around every ``mma`` instruction (the K-step loop)."""
    hmma = [a for a, t in insns if mma in t]
    best = None
    for a, t in insns:
        target = branch_target(t)
        if target is not None and hmma:
            if target <= min(hmma) and a >= max(hmma) and (best is None or a - target < best[1] - best[0]):
                best = (target, a)
    return [] if best is None else [(a, t) for a, t in insns if best[0] <= a <= best[1]]


def without_copy_issue(loop: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """``loop`` less the code the GEMM's one copy-issuing thread runs alone: the ranges that a forward
    branch skips which hold a bulk copy (``UBLKCP``), so what every other warp issues."""
    skip: set[int] = set()
    end = loop[-1][0] if loop else 0
    for a, t in loop:
        target = branch_target(t)
        if target is not None and a < target <= end:
            inside = [u for b, u in loop if a < b < target]
            if any("UBLKCP" in u for u in inside) and not any("GMMA" in u for u in inside):
                skip.update(b for b, _ in loop if a < b < target)
    return [(a, t) for a, t in loop if a not in skip]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--gemm-source", type=Path, default=GEMM_SOURCE)
    ap.add_argument("--define", action="append", default=[], help="NAME=VALUE, passed to nvcc as -D")
    ap.add_argument("--nvcc")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--json")
    args = ap.parse_args()
    nvcc, cuobjdump = tool("nvcc", args.nvcc), tool("cuobjdump", args.cuobjdump)
    with tempfile.TemporaryDirectory() as d:
        cubin, log = compile_cases(args.source, args.gemm_source, args.define, nvcc, Path(d))
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ptxas = ptxas_report(log)
    funcs: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in sass.splitlines():
        m = FUNC.search(line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name and (m := INSN.match(line)):
            funcs[name].append((int(m.group(1), 16), m.group(2)))
    rows = []
    for case, t, b, nt, norm, sx, r in CASES:
        # mangled template arguments, e.g. ...I13__nv_bfloat16Li4ELi1ELb1ELb1ELi2EE...
        gs = group_log2(nt)
        # then KCHK = false (Lb0E): the kernels for K in whole steps; optional, so sources before round 16 count too
        tag = f"Li{b}ELi{nt}ELb{int(norm == 'true')}ELb{int(sx == 'true')}ELi{r}ELi{gs if gs >= 0 else f'n{-gs}'}E(Lb0E)?E"
        mangled = next(f for f in funcs if re.search(tag, f) and ("bfloat16" in f) == (t == "__nv_bfloat16"))
        loop = step_loop(funcs[mangled])
        ops = collections.Counter(opcode(x) for _, x in loop)
        rows.append({"case": case, **ptxas.get(mangled, {}), "loop_insns": len(loop), "hmma": ops["HMMA"],
                     "top": dict(ops.most_common(8))})
    for c in GEMM_CASES:
        case, kern, t = c[:3]
        tag = f"{len(kern)}{kern}I.*" + "".join(f"Li{v}E" for v in gemm_args(args.gemm_source, c)) + "E"
        mangled = next(f for f in funcs if re.search(tag, f) and ("bfloat16" in f) == (t == "__nv_bfloat16"))
        full = step_loop(funcs[mangled], "HGMMA")
        loop = without_copy_issue(full)
        ops = collections.Counter(opcode(x) for _, x in loop)
        rows.append({"case": case, **ptxas.get(mangled, {}), "loop_insns": len(loop), "with_copy_issue": len(full),
                     "hmma": ops["HGMMA"], "top": dict(ops.most_common(8))})
    print("| case | registers | spill loads | step-loop instructions | HMMA / HGMMA | most frequent |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
        print(f"| {r['case']} | {r.get('registers')} | {r.get('spill_loads')} | {r['loop_insns']} | {r['hmma']} | {top} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": str(args.source), "defines": args.define, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
