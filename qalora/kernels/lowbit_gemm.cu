// Large-M fused dequant-GEMM for the tile layout (qalora/kernels/layout.py), sm_90a: the codes are
// dequantized in registers straight into wgmma's A operand (the weight, 64 rows per warpgroup), x is the
// B operand in shared memory (x first put in slab order, gpu_matmul.x_slab_order). The bf16/fp16 weight
// is never written anywhere; each weight element is s q + (-s z) in fp32 rounded once to T
// (dequant_slab), as dequantize-then-cuBLAS rounds it, so y matches that path up to the order of the sums.
//
// Included after lowbit_cuda.cu (Num, pair, cp_async16/commit/wait, ld_stream) by each translation unit.
//
// Why A = weight: wgmma takes A from registers, B only from shared memory. A weight dequantized in
// registers as B must first be stored to shared memory behind a barrier (the Triton version,
// lowbit_gemm_triton.py: 1.4-2.4x slower than dequantize + cuBLAS). As A, the lane's layout words are
// its A fragment already: warp w of a warpgroup holds rows 16 w .. 16 w + 15, the m16n8k16 A layout,
// which is this warp's 16-row tile. The k order of a fragment is the layout's: k slots 2 t + 8 h + {0, 1}
// of slab (sp, f) are columns 32 sp + 8 t + 4 f + 2 h + {0, 1}. So x is first copied into that order
// (slab order: within each 32 columns, (f, h, t, j) <- (t, f, h, j)), one pass over x that lets every
// block stage 16-byte rows of its core matrices with plain 16-byte copies.

#include <type_traits>

namespace qlb {

#define QLB_ACC8(d, i)                                                                                       \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])

// acc [64, N] (fp32, the m64nN accumulator fragment: BN / 2 registers) += A [64, 16] (4 registers per
// lane, T) x B [16, N] (shared memory, descriptor b, K-major); always accumulates (scale-d = 1).
template <int N>
struct Wgmma;
#define QLB_WGMMA_64(DT)                                                                                          \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %37, 0; "                                                           \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " "                                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "      \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                                    \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 0;}"                                                          \
               : QLB_ACC8(d, 0), QLB_ACC8(d, 8), QLB_ACC8(d, 16), QLB_ACC8(d, 24)                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
template <> struct Wgmma<64> {
  template <typename T>
  __device__ static void run(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    if constexpr (std::is_same<T, __half>::value) QLB_WGMMA_64("f16");
    else QLB_WGMMA_64("bf16");
  }
};
#undef QLB_WGMMA_64
#define QLB_WGMMA_128(DT)                                                                                         \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %69, 0; "                                                           \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " "                                       \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "      \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "       \
               "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "       \
               "%56, %57, %58, %59, %60, %61, %62, %63}, "                                                        \
               "{%64, %65, %66, %67}, %68, p, 1, 1, 0;}"                                                          \
               : QLB_ACC8(d, 0), QLB_ACC8(d, 8), QLB_ACC8(d, 16), QLB_ACC8(d, 24),                                \
                 QLB_ACC8(d, 32), QLB_ACC8(d, 40), QLB_ACC8(d, 48), QLB_ACC8(d, 56)                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
template <> struct Wgmma<128> {
  template <typename T>
  __device__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    if constexpr (std::is_same<T, __half>::value) QLB_WGMMA_128("f16");
    else QLB_WGMMA_128("bf16");
  }
};
#undef QLB_WGMMA_128
#define QLB_WGMMA_256(DT)                                                                                         \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %133, 0; "                                                          \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." DT "." DT " "                                       \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "      \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "       \
               "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "       \
               "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "       \
               "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "       \
               "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, "   \
               "%109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "       \
               "%124, %125, %126, %127}, "                                                                        \
               "{%128, %129, %130, %131}, %132, p, 1, 1, 0;}"                                                     \
               : QLB_ACC8(d, 0), QLB_ACC8(d, 8), QLB_ACC8(d, 16), QLB_ACC8(d, 24),                                \
                 QLB_ACC8(d, 32), QLB_ACC8(d, 40), QLB_ACC8(d, 48), QLB_ACC8(d, 56),                              \
                 QLB_ACC8(d, 64), QLB_ACC8(d, 72), QLB_ACC8(d, 80), QLB_ACC8(d, 88),                              \
                 QLB_ACC8(d, 96), QLB_ACC8(d, 104), QLB_ACC8(d, 112), QLB_ACC8(d, 120)                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
template <> struct Wgmma<256> {
  template <typename T>
  __device__ static void run(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
    if constexpr (std::is_same<T, __half>::value) QLB_WGMMA_256("f16");
    else QLB_WGMMA_256("bf16");
  }
};
#undef QLB_WGMMA_256


__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// shared memory written by cp.async (the generic proxy) and read next by wgmma (the async proxy)
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// the compiler must not move accumulator reads or writes across the asynchronous wgmma region
template <int R>
__device__ __forceinline__ void acc_fence(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major operand in the 128-byte swizzle layout (x_slot's): rows of 128 bytes
// (64 columns), 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes apart
// (SBO), atoms 1024-byte aligned. A k16 slab is 32 bytes of each row: its descriptor starts 32 bytes
// further per slab, the hardware applying the swizzle to the full address. (Without swizzle, core
// matrices of 8 x 16 bytes side by side, ncu counted 3.5x the ideal shared-memory wavefronts on
// the wgmmas' B reads; round 7, call 3.)
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  constexpr uint64_t hi = (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | hi;
}

// 16-byte cp.async; zeros where !ok
__device__ __forceinline__ void cp_async16z(uint32_t smem, const void* gmem, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(ok ? 16 : 0) : "memory");
}

struct GemmArgs {
  const void* x;       // x in slab order (x_slab_order), T [M, S * 256], row stride a multiple of 8
  const uint4* tiles;  // uint4 [T, S, BITS, 32]
  const float4* coef;  // float4 [T, Lp, 8]
  const float* bias;   // [N] or null
  void* out;           // T [M, N], or [M, N/2] with glu
  int M, N, S, Lp, log2_spg, ntiles;
  long long stride_xm, stride_om;
  bool glu;
};

// k-block kb (KBS slabs of 16 columns) of x rows m0 .. m0 + BN - 1 into slot, as wgmma's B operand:
// KBS / 4 atoms of 64 columns, each BN rows of 128 bytes in the 128-byte swizzle (desc_sw128): chunk c
// (8 columns) of row r of atom at at byte
//   at BN 128 + r 128 + 16 (c ^ (r % 8)).
// x is in slab order, so a slab's 16 k slots are 32 contiguous bytes of it. Thread i copies chunk
// (8-row group, chunk of the k-block) ((i >> 3) + 16 WG j) of row i % 8: eight lanes fill eight rows'
// chunks, one in each 16-byte bank group; four chunks of a row lie side by side in memory.
template <typename T, int BN, int WG, int KBS>
__device__ __forceinline__ void load_x(const GemmArgs& a, uint32_t slot, int m0, int kb) {
  constexpr int CPR = 2 * KBS;                // 16-byte chunks per row of a k-block
  constexpr int NS8 = 16 * WG / CPR;          // 8-row groups advanced per round
  constexpr int PER = BN / 8 / NS8;           // rounds
  static_assert((16 * WG) % CPR == 0 && (BN / 8) % NS8 == 0, "block shape");
  const int r = threadIdx.x & 7, c8 = threadIdx.x >> 3;
  const int ch = c8 % CPR, n80 = c8 / CPR;
  const int row = m0 + 8 * n80 + r;
  const T* src = reinterpret_cast<const T*>(a.x) + static_cast<long long>(row) * a.stride_xm + kb * 16 * KBS + 8 * ch;
  const uint32_t dst = slot + (ch >> 3) * BN * 128 + (8 * n80 + r) * 128 + (((ch & 7) ^ r) << 4);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const bool ok = row + 8 * NS8 * j < a.M;
    cp_async16z(dst + j * NS8 * 1024, ok ? src + 8LL * NS8 * j * a.stride_xm : a.x, ok);
  }
}

// A fragment of slab sl (span sl / 2, fragment sl % 2) of the lane's step words w: T pairs of
// s q + (-s z) in fp32, rounded once; c = the span's group coefficients with -1024 s folded into the
// zero term (load_step). The codes arrive as fp16 1024 + q (one LOP3 per pair), which one FMA per value
// takes as they are: s (1024 + q) + (-s z - 1024 s), the fold's fp32 rounding ~1e-4 of a bf16 step
// (H200, LLaMA shapes: the same output bits as recovering q first; 0-8% faster, round 7).
template <typename T, int BITS>
__device__ __forceinline__ void dequant_slab(const uint32_t* w, int sl, const float4& c, uint32_t (&av)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 q = Num<__half>::f2(pair<BITS>(w, 8 * (sl >> 1) + 4 * (sl & 1) + i, Num<__half>::magic));
    const float sc = (i & 1) ? c.z : c.x, zc = (i & 1) ? c.w : c.y;
    av[i] = Num<T>::pack(fmaf(q.x, sc, zc), fmaf(q.y, sc, zc));
  }
}

// The A fragments of the KBS slabs from slab sl0 of the lane's step words w; cf: the step's groups.
template <typename T, int BITS, int KBS, int L2S, int NG>
__device__ __forceinline__ void dequant_block(const uint32_t* w, const float4 (&cf)[NG], int sl0,
                                              uint32_t (&av)[KBS][4]) {
#pragma unroll
  for (int q = 0; q < KBS; ++q) {
    const int sl = sl0 + q;
    dequant_slab<T, BITS>(w, sl, cf[L2S >= 3 ? 0 : (sl >> 1) >> L2S], av[q]);
  }
}

// One step's codes (BITS uint4 per lane) and its NG groups' coefficients (rows g, g + 8), folded.
template <int BITS, int NG>
__device__ __forceinline__ void load_step(const GemmArgs& a, const uint4* wsrc, const float4* csrc, int s,
                                          uint32_t (&w)[4 * BITS], float4 (&cf)[NG]) {
#pragma unroll
  for (int j = 0; j < BITS; ++j) {
    const uint4 v = ld_stream(wsrc + (s * BITS + j) * 32);
    w[4 * j] = v.x; w[4 * j + 1] = v.y; w[4 * j + 2] = v.z; w[4 * j + 3] = v.w;
  }
  const int g0 = (s * 8) >> a.log2_spg;
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    cf[j] = __ldg(csrc + (g0 + j) * 8);
    cf[j].y = fmaf(-1024.f, cf[j].x, cf[j].y);  // dequant_slab's fold
    cf[j].w = fmaf(-1024.f, cf[j].z, cf[j].w);
  }
}

// Queue a k-block's KBS wgmmas (A fragments av, x k-block at shared address xb) as one commit group.
template <typename T, int BN, int KBS>
__device__ __forceinline__ void issue_kblock(float (&acc)[BN / 2], const uint32_t (&av)[KBS][4], uint32_t xb) {
  wgmma_fence();
#pragma unroll
  for (int q = 0; q < KBS; ++q)  // slab q: atom q / 4, bytes 32 (q % 4) of its rows
    Wgmma<BN>::template run<T>(acc, av[q], desc_sw128(xb + (q >> 2) * BN * 128 + (q & 3) * 32));
  wgmma_commit();
}

// y [M, N] = x [M, K] W^T (+ bias), or silu(gate) * up [M, N/2] (glu).
// grid (cdiv(M, BN), cdiv(#tiles, 4 WG)), block 128 WG: warpgroup wg takes the 64 rows of tiles
// 4 (WG y + wg) .. +3 (warp w: tile 4 WG y + w) against BN rows of x. Blocks along x share one block of
// weights and run side by side, so it is read from HBM about once. The K loop runs over k-blocks of
// 16 KBS columns: x staged in an NS-slot ring by cp.async, NS - 1 k-blocks ahead; a k-block's KBS
// wgmmas are issued back to back while the next k-block's A fragments are dequantized into the other
// half of a register double buffer; the next step's codes (256 columns) are loaded into the same
// registers once the step's last k-block is decoded, a k-block ahead (a second buffer spilled at 256 x
// rows). L2S: log2 of the spans of 32 columns per group, capped at 3 (one group per step or more: NG = 1).
template <typename T, int BITS, int BN, int WG, int KBS, int NS, int L2S>
__global__ void __launch_bounds__(128 * WG, 1) gemm_kernel(const GemmArgs a) {
  constexpr int NG = L2S >= 3 ? 1 : 8 >> L2S;  // groups per step
  constexpr int SLOT = BN * KBS * 32;          // bytes of one k-block of x
  constexpr int KBPS = 16 / KBS;               // k-blocks per step
  static_assert(KBS % 4 == 0 && 16 % KBS == 0 && NS >= 3, "KBS: whole 64-column atoms dividing a step; NS >= 3");
  extern __shared__ __align__(1024) char smem_raw[];
  // swizzle atoms must sit on 1024-byte boundaries (the launcher allocates 1 KB extra)
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BN;
  const int tile = blockIdx.y * 4 * WG + warp;
  const int tl = min(tile, a.ntiles - 1);  // tiles past the last re-read it and store nothing
  const uint4* wsrc = a.tiles + static_cast<size_t>(tl) * a.S * BITS * 32 + lane;
  const float4* csrc = a.coef + static_cast<size_t>(tl) * a.Lp * 8 + g;
  const int nkb = a.S * KBPS;

#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nkb) load_x<T, BN, WG, KBS>(a, smem + i * SLOT, m0, i);
    cp_commit();
  }
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  acc_fence(acc);
  uint32_t w[4 * BITS];     // the codes of the step being dequantized
  float4 cf[NG];
  uint32_t av[2][KBS][4];  // A fragments of two k-blocks: one read by wgmmas in flight, one being written
  load_step<BITS, NG>(a, wsrc, csrc, 0, w, cf);
  dequant_block<T, BITS, KBS, L2S>(w, cf, 0, av[0]);
  cp_wait_pending(NS - 2);  // k-block 0 of x has landed
  fence_async_smem();
  __syncthreads();

  for (int s = 0; s < a.S; ++s) {
#pragma unroll
    for (int kbl = 0; kbl < KBPS; ++kbl) {
      const int kb = s * KBPS + kbl;
      issue_kblock<T, BN, KBS>(acc, av[kbl & 1], smem + (kb % NS) * SLOT);
      // while they run: k-block kb + 1's A fragments, where k-block kb - 1's were (wait for its wgmmas)
      if (kbl + 1 < KBPS || s + 1 < a.S) {
        wgmma_wait<1>();
        dequant_block<T, BITS, KBS, L2S>(w, cf, ((kbl + 1) % KBPS) * KBS, av[(kbl + 1) & 1]);
        // the step's last k-block decoded: the next step's codes go to the same registers
        if (kbl + 2 == KBPS && s + 1 < a.S) load_step<BITS, NG>(a, wsrc, csrc, s + 1, w, cf);
      }
      // x k-block kb + 1 landed for everyone; every warpgroup is past k-block kb - 1, so its slot takes
      // k-block kb + NS - 1
      cp_wait_pending(NS - 3);
      fence_async_smem();
      __syncthreads();
      if (kb + NS - 1 < nkb) load_x<T, BN, WG, KBS>(a, smem + ((kb + NS - 1) % NS) * SLOT, m0, kb + NS - 1);
      cp_commit();
    }
  }
  wgmma_wait<0>();
  acc_fence(acc);

  // acc[4 j + e]: weight row 16 tile + g + 8 (e >> 1), x row m0 + 8 j + 2 t + (e & 1)
  if (tile >= a.ntiles) return;
  const int row0 = tile * 16 + g;
  float b0 = 0.f, b1 = 0.f;
  if (a.bias != nullptr) {
    if (row0 < a.N) b0 = a.bias[row0];
    if (row0 + 8 < a.N) b1 = a.bias[row0 + 8];
  }
  T* out = reinterpret_cast<T*>(a.out);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int m = m0 + 8 * j + 2 * t + c;
      if (m >= a.M) continue;
      const float y0 = acc[4 * j + c] + b0, y1 = acc[4 * j + 2 + c] + b1;
      if (a.glu) {  // rows g (gate) and g + 8 (up) of the tile: output 8 tile + g
        if (tile * 8 + g < a.N / 2) out[m * a.stride_om + tile * 8 + g] = Num<T>::from(y0 / (1.f + __expf(-y0)) * y1);
      } else {
        if (row0 < a.N) out[m * a.stride_om + row0] = Num<T>::from(y0);
        if (row0 + 8 < a.N) out[m * a.stride_om + row0 + 8] = Num<T>::from(y1);
      }
    }
  }
}

}  // namespace qlb

#ifdef QLB_TU_BITS
namespace {

// Block shapes the launcher can take, by index (benchmarks/gemm_ab.py sweeps them):
//   X(index, BN x rows, WG warpgroups (64 weight rows each), KBS slabs per k-block, NS ring slots)
#define QLB_GEMM_CONFIGS(X) \
  X(0, 128, 2, 8, 4)        \
  X(1, 256, 2, 4, 4)        \
  X(2, 128, 2, 4, 4)        \
  X(3, 64, 2, 8, 4)         \
  X(4, 128, 1, 4, 4)

template <typename T, int BN, int WG, int KBS, int NS>
void launch_gemm_cfg(const qlb::GemmArgs& a) {
  constexpr int BITS = QLB_TU_BITS;
  const int smem = NS * BN * KBS * 32 + 1024;  // + alignment of the swizzle atoms
  const dim3 grid((a.M + BN - 1) / BN, (a.ntiles + 4 * WG - 1) / (4 * WG)), block(128 * WG);
  TORCH_CHECK(grid.y <= 65535, "gemm: too many weight rows for one launch");
  auto go = [&](auto kern) {
    const int dyn_max = smem_optin(reinterpret_cast<const void*>(kern));
    TORCH_CHECK(smem <= dyn_max, "gemm needs ", smem, " bytes of shared memory, the device allows ", dyn_max);
    kern<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  };
  switch (std::min(a.log2_spg, 3)) {
    case 0: go(qlb::gemm_kernel<T, BITS, BN, WG, KBS, NS, 0>); break;
    case 1: go(qlb::gemm_kernel<T, BITS, BN, WG, KBS, NS, 1>); break;
    case 2: go(qlb::gemm_kernel<T, BITS, BN, WG, KBS, NS, 2>); break;
    default: go(qlb::gemm_kernel<T, BITS, BN, WG, KBS, NS, 3>); break;
  }
}

template <typename T>
void launch_gemm(const qlb::GemmArgs& a, int cfg) {
  switch (cfg) {
#define QLB_GEMM_CASE(I, BN, WG, KBS, NS) \
  case I: launch_gemm_cfg<T, BN, WG, KBS, NS>(a); break;
    QLB_GEMM_CONFIGS(QLB_GEMM_CASE)
#undef QLB_GEMM_CASE
    default: TORCH_CHECK(false, "gemm: no block shape ", cfg);
  }
}

}  // namespace

// xs: x in slab order, [M, S * 256] (fp16 / bf16); out [M, N] (or [M, N / 2] with glu), x's dtype
void QLB_CAT(gemm_b, QLB_TU_BITS)(torch::Tensor xs, torch::Tensor tiles, torch::Tensor coef, torch::Tensor bias,
                                  torch::Tensor out, int64_t n, int64_t log2_spg, bool glu, int64_t cfg) {
  TORCH_CHECK(xs.stride(1) == 1 && xs.stride(0) % 8 == 0 && xs.data_ptr() != nullptr &&
                  reinterpret_cast<uintptr_t>(xs.data_ptr()) % 16 == 0,
              "gemm: x must have unit column stride, 16-byte aligned rows");
  TORCH_CHECK(xs.size(1) == tiles.size(1) * 256, "gemm: x must be padded to the layout's ", tiles.size(1) * 256,
              " columns");
  qlb::GemmArgs a;
  a.x = xs.data_ptr();
  a.tiles = reinterpret_cast<const uint4*>(tiles.data_ptr());
  a.coef = reinterpret_cast<const float4*>(coef.data_ptr());
  a.bias = bias.numel() > 0 ? bias.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.M = xs.size(0); a.N = n; a.S = tiles.size(1); a.Lp = coef.size(1); a.log2_spg = log2_spg;
  a.ntiles = tiles.size(0);
  a.stride_xm = xs.stride(0); a.stride_om = out.stride(0);
  a.glu = glu;
  if (xs.scalar_type() == at::kBFloat16) launch_gemm<__nv_bfloat16>(a, cfg);
  else launch_gemm<__half>(a, cfg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif
