"""Builds and loads the CUDA kernels (``lowbit_cuda.cu``: the skinny GEMV and the dequant kernel;
``lowbit_gemm.cu``: the wgmma GEMM for prefill and 17-32-row decode batches, sm_90a) on first use;
importing this module compiles nothing.

The two .cu files are compiled as translation units built in parallel by ninja: one per bit width
(``QLB_TU_BITS``) for the GEMV and dequant kernels and, on Hopper, one per bit width and activation type
(``QLB_TU_GEMM``) for the GEMM, plus a small C++ binding. torch caches the build (``TORCH_EXTENSIONS_DIR``,
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
GEMM_SOURCE = Path(__file__).with_name("lowbit_gemm.cu")
BITS = (2, 3, 4)
ERR_BYTES = 1024  # a launcher's error message, at most (lowbit_cuda.cu's QLB_ERR_BYTES)

# gemv/dequant/gemm dispatch to the per-bit-width launchers of lowbit_cuda.cu and lowbit_gemm.cu. The
# launchers never throw: they leave an error message in `err` and QLB_RAISE raises it here. Messages are
# formatted with snprintf and TORCH_CHECK is given one finished string: c10::str formatting a number
# crashed the process on the H200 machine (lowbit_cuda.cu, at QLB_ERR_BYTES).
BINDING = """
#include <cstdio>
#include <torch/extension.h>
#define QLB_DECL(B)                                                                                          \\
  void gemv_b##B(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,   \\
                 torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, int64_t,  \\
                 double, int64_t, int64_t, bool, bool, char*);                                              \\
  void dequant_b##B(torch::Tensor, torch::Tensor, torch::Tensor, int64_t, char*);                            \\
  void gemm_b##B##_bf16(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,      \\
                       int64_t, int64_t, bool, int64_t, bool, int64_t, torch::Tensor, torch::Tensor, char*); \\
  void gemm_b##B##_f16(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,       \\
                      int64_t, int64_t, bool, int64_t, bool, int64_t, torch::Tensor, torch::Tensor, char*);
QLB_DECL(2) QLB_DECL(3) QLB_DECL(4)
void gemm_x_image(torch::Tensor, torch::Tensor, char*);

// f(args..., err), then the launcher's error, if any, as a RuntimeError
#define QLB_RAISE(f, ...)                          \\
  do {                                             \\
    char err_[QLB_ERR_BYTES] = "";                 \\
    f(__VA_ARGS__, err_);                          \\
    TORCH_CHECK(err_[0] == 0, err_);               \\
  } while (0)

// fp32 or empty: the optional norm weight and bias, which the launchers read as float
void check_f32(const torch::Tensor& t, const char* name) {
  if (t.numel() == 0 || (t.scalar_type() == at::kFloat && t.is_contiguous())) return;
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s must be a contiguous fp32 tensor, got %s", name, c10::toString(t.scalar_type()));
  TORCH_CHECK(false, msg);
}

// x [M, K] (fp16/bf16, or fp32 with nw), tiles int32 [T, S, bits, 32, 4], coef fp32 [T, Lp, 8, 4],
// out: [M, N] (epi 0, compute dtype), fp32 [M, N] (epi 1), [M, N/2] (epi 2); pdl: programmatic
// dependent launch. ss_in fp32 [M, P]: x is x * nw already, these its partial sums of squares (the
// norm is applied from them); nw_next fp32 [N], xn_out [M, N], ss_out fp32 [M, T] (epi 1): the next
// norm's input as well. Empty tensors: none.
void gemv(torch::Tensor x, torch::Tensor nw, torch::Tensor tiles, torch::Tensor coef, torch::Tensor bias,
          torch::Tensor out, torch::Tensor ss_in, torch::Tensor nw_next, torch::Tensor xn_out, torch::Tensor ss_out,
          int64_t bits, int64_t n, int64_t k, int64_t log2_spg, int64_t epi, double eps, int64_t warps, int64_t stages,
          bool bf16, bool pdl) {
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 32, "gemv takes 1..32 rows");
  TORCH_CHECK(warps >= 1 && warps <= 8, "1..8 warps per block");
  TORCH_CHECK(stages >= 1 && stages <= 4, "1..4 pipeline stages");
  check_f32(nw, "the norm weight");
  check_f32(bias, "the bias");
  check_f32(ss_in, "the partial sums of squares");
  check_f32(nw_next, "the next norm weight");
  check_f32(ss_out, "the sums of squares out");
  const auto t = bf16 ? at::kBFloat16 : at::kHalf;
  TORCH_CHECK(xn_out.numel() == 0 || (xn_out.is_contiguous() && xn_out.scalar_type() == t),
              "the next norm's input must be contiguous, in the compute dtype");
#define QLB_GEMV_B(B) \\
  QLB_RAISE(gemv_b##B, x, nw, tiles, coef, bias, out, ss_in, nw_next, xn_out, ss_out, n, k, log2_spg, epi, eps, \\
            warps, stages, bf16, pdl)
  if (bits == 4) QLB_GEMV_B(4);
  else if (bits == 3) QLB_GEMV_B(3);
  else if (bits == 2) QLB_GEMV_B(2);
  else TORCH_CHECK(false, "bits must be 2, 3 or 4");
#undef QLB_GEMV_B
}

// out [N, K] (fp16 / bf16 / fp32) = the dequantized weight
void dequant(torch::Tensor tiles, torch::Tensor coef, torch::Tensor out, int64_t bits, int64_t log2_spg) {
  const auto t = out.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, "dequant: out must be fp16, bf16 or fp32");
  if (bits == 4) QLB_RAISE(dequant_b4, tiles, coef, out, log2_spg);
  else if (bits == 3) QLB_RAISE(dequant_b3, tiles, coef, out, log2_spg);
  else if (bits == 2) QLB_RAISE(dequant_b2, tiles, coef, out, log2_spg);
  else TORCH_CHECK(false, "bits must be 2, 3 or 4");
}

// xs: x's image [4 S, Mp, 64] (x_image; fp16 / bf16); m: x's rows; out [M, N] ([M, N/2] with glu), or fp32
// [M, N] receiving out += (accum); cfg: block shape (lowbit_gemm.cu's QLB_GEMM_CONFIGS); splits of K (> 1:
// fp32 part [splits, M, N] and zeroed int32 sem, one per block of a split). Hopper (sm_90a) only.
void gemm(torch::Tensor xs, torch::Tensor tiles, torch::Tensor coef, torch::Tensor bias, torch::Tensor out,
          int64_t bits, int64_t m, int64_t n, int64_t log2_spg, bool glu, int64_t cfg, bool accum, int64_t splits,
          torch::Tensor part, torch::Tensor sem) {
#if defined(QLB_NO_GEMM)
  TORCH_CHECK(false, "the wgmma GEMM was not built (it needs a Hopper GPU, sm_90a)");
#else
  TORCH_CHECK(xs.scalar_type() == at::kBFloat16 || xs.scalar_type() == at::kHalf, "gemm: x must be fp16 or bf16");
  const bool bf = xs.scalar_type() == at::kBFloat16;
  check_f32(bias, "the bias");
#define QLB_GEMM_B(B)                                                                                        \\
  QLB_RAISE((bf ? gemm_b##B##_bf16 : gemm_b##B##_f16), xs, tiles, coef, bias, out, m, n, log2_spg, glu, cfg, accum, \\
            splits, part, sem)
  if (bits == 4) QLB_GEMM_B(4);
  else if (bits == 3) QLB_GEMM_B(3);
  else if (bits == 2) QLB_GEMM_B(2);
  else TORCH_CHECK(false, "bits must be 2, 3 or 4");
#undef QLB_GEMM_B
#endif
}

// x [M, K] (16-bit) -> out [A, Mp, 64]: x's image for the GEMM (lowbit_gemm.cu's x_image_kernel)
void x_image(torch::Tensor x, torch::Tensor out) {
#if defined(QLB_NO_GEMM)
  TORCH_CHECK(false, "the wgmma GEMM was not built (it needs a Hopper GPU, sm_90a)");
#else
  QLB_RAISE(gemm_x_image, x, out);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv);
  m.def("dequant", &dequant);
  m.def("gemm", &gemm);
  m.def("x_image", &x_image);
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
    """The compiled extension (functions ``gemv``, ``dequant``, ``gemm`` and ``x_image``, see BINDING)."""
    return build(SOURCE.read_text())


@functools.lru_cache(maxsize=None)
def build(src: str, defines: tuple[str, ...] = (), gemm_src: str | None = None, with_gemm: bool = True) -> ModuleType:
    """Compile ``src`` (a version of ``lowbit_cuda.cu``) and ``gemm_src`` (of ``lowbit_gemm.cu``, default
    the shipped one) with ``-D`` ``defines``: the shipped kernels through :func:`ext`, earlier versions
    and variants side by side in one benchmark process. Off Hopper, or with ``with_gemm=False`` (GEMV
    variants: 4 units to compile instead of 10), the GEMM is left out and ``gemm`` raises."""
    from torch.utils.cpp_extension import _get_build_directory, load

    major, minor = torch.cuda.get_device_capability()
    hopper = major == 9
    gemm = hopper and with_gemm
    gemm_src = GEMM_SOURCE.read_text() if gemm_src is None else gemm_src
    key = src + gemm_src + BINDING + repr(defines) + repr(gemm) + repr(ERR_BYTES)
    name = "qalora_lowbit_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    build_dir = Path(_get_build_directory(name, verbose=False))
    tu = '#define QLB_TU_BITS {}\n#include "lowbit_cuda.cuh"\n'
    texts = {"binding.cpp": ("" if gemm else "#define QLB_NO_GEMM\n") + f"#define QLB_ERR_BYTES {ERR_BYTES}\n" + BINDING,
             "lowbit_cuda.cuh": src,
             "lowbit_gemm.cuh": gemm_src, **{f"lowbit_b{b}.cu": tu.format(b) for b in BITS}}
    if gemm:  # the GEMM's kernels, one unit per bit width and activation type (x_image in one of them)
        for b in BITS:
            for tname, t in (("bf16", "__nv_bfloat16"), ("f16", "__half")):
                texts[f"gemm_b{b}_{tname}.cu"] = (
                    f"#define QLB_TU_GEMM {t}\n#define QLB_TU_GEMM_NAME _{tname}\n"
                    + ("#define QLB_TU_X_IMAGE\n" if (b, tname) == (4, "bf16") else "")
                    + tu.format(b) + '#include "lowbit_gemm.cuh"\n')
    for fname, text in texts.items():  # rewritten only when changed: a newer file makes ninja rebuild
        f = build_dir / fname
        if not f.is_file() or f.read_text() != text:
            f.write_text(text)
    files = [build_dir / f for f in texts if not f.endswith(".cuh")]
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a on Hopper
    os.environ.setdefault("MAX_JOBS", str(len(files)))
    return load(name=name, sources=[str(f) for f in files], build_directory=str(build_dir),
                extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                   f"-DQLB_ERR_BYTES={ERR_BYTES}", *(f"-D{d}" for d in defines)],
                verbose=False)
