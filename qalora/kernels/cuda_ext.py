"""Builds and loads the CUDA kernels (``lowbit_cuda.cu``) on first use; importing this module
compiles nothing.

The .cu file is compiled as three translation units, one per bit width (``QLB_TU_BITS``), in
parallel by ninja, plus a small C++ binding. torch caches the build (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) under a name hashing the sources: an edited kernel is
rebuilt, an unchanged one is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("lowbit_cuda.cu")
BITS = (2, 3, 4)

# gemv/dequant dispatch to the per-bit-width launchers of lowbit_cuda.cu
BINDING = """
#include <torch/extension.h>
#define QLB_DECL(B)                                                                                          \\
  void gemv_b##B(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,   \\
                 int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t, bool, bool);                 \\
  void dequant_b##B(torch::Tensor, torch::Tensor, torch::Tensor, int64_t);
QLB_DECL(2) QLB_DECL(3) QLB_DECL(4)

// x [M, K] (fp16/bf16, or fp32 with nw), tiles int32 [T, S, bits, 32, 4], coef fp32 [T, Lp, 8, 4],
// out: [M, N] (epi 0, compute dtype), fp32 [M, N] (epi 1), [M, N/2] (epi 2); pdl: programmatic
// dependent launch
void gemv(torch::Tensor x, torch::Tensor nw, torch::Tensor tiles, torch::Tensor coef, torch::Tensor bias,
          torch::Tensor out, int64_t bits, int64_t n, int64_t k, int64_t log2_spg, int64_t epi, double eps,
          int64_t warps, int64_t stages, bool bf16, bool pdl) {
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 32, "gemv takes 1..32 rows");
  TORCH_CHECK(warps >= 1 && warps <= 8, "1..8 warps per block");
  TORCH_CHECK(stages >= 1 && stages <= 4, "1..4 pipeline stages");
  if (bits == 4) gemv_b4(x, nw, tiles, coef, bias, out, n, k, log2_spg, epi, eps, warps, stages, bf16, pdl);
  else if (bits == 3) gemv_b3(x, nw, tiles, coef, bias, out, n, k, log2_spg, epi, eps, warps, stages, bf16, pdl);
  else if (bits == 2) gemv_b2(x, nw, tiles, coef, bias, out, n, k, log2_spg, epi, eps, warps, stages, bf16, pdl);
  else TORCH_CHECK(false, "bits must be 2, 3 or 4");
}

// out [N, K] (fp16 / bf16 / fp32) = the dequantized weight
void dequant(torch::Tensor tiles, torch::Tensor coef, torch::Tensor out, int64_t bits, int64_t log2_spg) {
  if (bits == 4) dequant_b4(tiles, coef, out, log2_spg);
  else if (bits == 3) dequant_b3(tiles, coef, out, log2_spg);
  else if (bits == 2) dequant_b2(tiles, coef, out, log2_spg);
  else TORCH_CHECK(false, "bits must be 2, 3 or 4");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv);
  m.def("dequant", &dequant);
}
"""


@functools.lru_cache(maxsize=1)
def cuda_kernels_available() -> bool:
    """True when CUDA is up and a CUDA compiler is known to torch (the build itself runs later)."""
    if not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


@functools.lru_cache(maxsize=1)
def ext() -> ModuleType:
    """The compiled extension (functions ``gemv`` and ``dequant``, see BINDING)."""
    return build(SOURCE.read_text())


@functools.lru_cache(maxsize=None)
def build(src: str, defines: tuple[str, ...] = ()) -> ModuleType:
    """Compile ``src`` (a version of ``lowbit_cuda.cu``) with ``-D`` ``defines``: the shipped kernel
    through :func:`ext`, earlier versions and variants side by side in one benchmark process."""
    from torch.utils.cpp_extension import _get_build_directory, load

    name = "qalora_lowbit_" + hashlib.sha256((src + BINDING + repr(defines)).encode()).hexdigest()[:12]
    build_dir = Path(_get_build_directory(name, verbose=False))
    texts = {"binding.cpp": BINDING, "lowbit_cuda.cuh": src,
             **{f"lowbit_b{b}.cu": f'#define QLB_TU_BITS {b}\n#include "lowbit_cuda.cuh"\n' for b in BITS}}
    for fname, text in texts.items():  # rewritten only when changed: a newer file makes ninja rebuild
        f = build_dir / fname
        if not f.is_file() or f.read_text() != text:
            f.write_text(text)
    files = [build_dir / f for f in texts if f != "lowbit_cuda.cuh"]
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a on Hopper
    os.environ.setdefault("MAX_JOBS", str(len(files)))
    return load(name=name, sources=[str(f) for f in files], build_directory=str(build_dir),
                extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                   *(f"-D{d}" for d in defines)],
                verbose=False)
