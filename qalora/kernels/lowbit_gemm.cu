// Fused dequant-GEMM for the tile layout (qalora/kernels/layout.py), sm_90a, for prefill (blocks of 32-256
// x rows) and decode batches of 17-32 rows on weights of many tiles (32-row blocks, one warpgroup): the codes are
// dequantized in registers straight into wgmma's A operand (the weight, 64 rows per warpgroup), x is the
// B operand in shared memory (x first laid out as the kernel copies it, gpu_matmul.x_image). The
// bf16/fp16 weight is never written anywhere; each weight element is s q + (-s z) in fp32 rounded once to
// T (dequant_slab), as dequantize-then-cuBLAS rounds it, so y matches that path up to the order of the sums.
//
// Included after lowbit_cuda.cu (Num, pair) by each of the GEMM's translation units.
//
// Why A = weight: wgmma takes A from registers, B only from shared memory. A weight dequantized in
// registers as B must first be stored to shared memory behind a barrier (the Triton version,
// lowbit_gemm_triton.py: 1.4-2.4x slower than dequantize + cuBLAS). As A, the lane's layout words are
// its A fragment already: warp w of a warpgroup holds rows 16 w .. 16 w + 15, the m16n8k16 A layout,
// which is this warp's 16-row tile. The k order of a fragment is the layout's: k slots 2 t + 8 h + {0, 1}
// of slab (sp, f) are columns 32 sp + 8 t + 4 f + 2 h + {0, 1}. So x is first put in that order (slab
// order: within each 32 columns, (f, h, t, j) <- (t, f, h, j)) and in the 128-byte swizzle of shared
// memory (x_image_kernel): one pass over x after which every load of the GEMM is one bulk copy.

#include <type_traits>

// blocks of up to this many x rows have split K compiled in (gpu_matmul.SPLIT_MAX_ROWS says the same)
#ifndef QLB_GEMM_SPLIT_ROWS
#define QLB_GEMM_SPLIT_ROWS 64
#endif
// QLB_GEMM_WS=0/1/2 (benchmarks): every block shape copies that way (gemm_kernel's WS) instead of its own
// (QLB_GEMM_CONFIGS); -1: its own
#ifndef QLB_GEMM_WS
#define QLB_GEMM_WS -1
#endif

namespace qlb {

#define QLB_ACC8(d, i)                                                                                       \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])

// acc [64, N] (fp32, the m64nN accumulator fragment: BN / 2 registers) += A [64, 16] (4 registers per
// lane, T) x B [16, N] (shared memory, descriptor b, K-major); always accumulates (scale-d = 1).
template <int N>
struct Wgmma;
// Wgmma<N>::run<T>: the m64nNk16 instruction of QLB_WGMMA_<N>(dtype) for T (fp16 or bf16)
#define QLB_WGMMA_STRUCT(N)                                                                         \
  template <> struct Wgmma<N> {                                                                     \
    template <typename T>                                                                           \
    __device__ static void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {             \
      if constexpr (std::is_same<T, __half>::value) QLB_WGMMA_##N("f16");                           \
      else QLB_WGMMA_##N("bf16");                                                                   \
    }                                                                                               \
  };
#define QLB_WGMMA_32(DT)                                                                                          \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %21, 0; "                                                           \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." DT "." DT " "                                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                         \
               "{%16, %17, %18, %19}, %20, p, 1, 1, 0;}"                                                          \
               : QLB_ACC8(d, 0), QLB_ACC8(d, 8)                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
QLB_WGMMA_STRUCT(32)
#define QLB_WGMMA_64(DT)                                                                                          \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %37, 0; "                                                           \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " "                                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "      \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                                    \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 0;}"                                                          \
               : QLB_ACC8(d, 0), QLB_ACC8(d, 8), QLB_ACC8(d, 16), QLB_ACC8(d, 24)                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
QLB_WGMMA_STRUCT(64)
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
QLB_WGMMA_STRUCT(128)
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
QLB_WGMMA_STRUCT(256)
#undef QLB_WGMMA_STRUCT
#undef QLB_WGMMA_32
#undef QLB_WGMMA_64
#undef QLB_WGMMA_128
#undef QLB_WGMMA_256


__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// the compiler must not move accumulator reads or writes across the asynchronous wgmma region
template <int R>
__device__ __forceinline__ void acc_fence(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major operand in the 128-byte swizzle layout (x_image's): rows of 128 bytes
// (64 columns), 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes apart
// (SBO), atoms 1024-byte aligned. A k16 slab is 32 bytes of each row: its descriptor starts 32 bytes
// further per slab, the hardware applying the swizzle to the full address. (Without swizzle, core
// matrices of 8 x 16 bytes side by side, ncu counted 3.5x the ideal shared-memory wavefronts on
// the wgmmas' B reads; round 7, call 3.)
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  constexpr uint64_t hi = (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | hi;
}

// mbarriers (one phase per fill of a ring slot) and the bulk copy engine (cp.async.bulk: one thread
// asks for a contiguous run of bytes, the copy completes on an mbarrier by its byte count)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// the inits visible to the async proxy (the bulk copies completing on them)
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{.reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;}" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// the block's consumer warps (all of them but the copy warps with WS) meet: named barrier 1
template <int WG, int WS>
__device__ __forceinline__ void consumers_sync() {
  if constexpr (WS) asm volatile("bar.sync 1, %0;" ::"n"(128 * WG) : "memory");
  else __syncthreads();
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

struct GemmArgs {
  const void* x;       // x's image (x_image_kernel), T [4 S, Mp, 64]
  const uint4* tiles;  // uint4 [T, S, BITS, 32]
  const float4* coef;  // float4 [T, Lp, 8]
  const float* bias;   // [N] or null
  void* out;           // T [M, N], or [M, N/2] with glu, or fp32 [M, N] with accum (out += x W^T)
  float* part;         // split K: fp32 [splits, M, N], each split's partial sums
  int* sem;            // split K: [#output tiles] arrival counters, zero between launches (the last resets)
  int M, Mp, N, S, Lp, log2_spg, ntiles, splits, nsem;  // Mp: M rounded up to 8 (x_image); nsem: sem's size
  long long stride_om;
  bool glu, accum;
};

// A fragment of slab sl (span sl / 2, fragment sl % 2) of the lane's step words w: T pairs of
// s q + (-s z) in fp32, rounded once; c = the span's group coefficients with -1024 s folded into the
// zero term (lds_step). The codes arrive as fp16 1024 + q (one LOP3 per pair), which one FMA per value
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

// Queue a k-block's KBS wgmmas (A fragments av, x k-block at shared address xb) as one commit group.
template <typename T, int BN, int KBS>
__device__ __forceinline__ void issue_kblock(float (&acc)[BN / 2], const uint32_t (&av)[KBS][4], uint32_t xb) {
  wgmma_fence();
#pragma unroll
  for (int q = 0; q < KBS; ++q)  // slab q: atom q / 4, bytes 32 (q % 4) of its rows
    Wgmma<BN>::template run<T>(acc, av[q], desc_sw128(xb + (q >> 2) * BN * 128 + (q & 3) * 32));
  wgmma_commit();
}

// f(i, m, row) for each of the lane's accumulators acc[i] = y[m, row] inside [M, N]: acc[4 j + e] is weight
// row row0 + 8 (e >> 1) (row0 = 16 (tile0 + warp) + g), x row m0 + 8 j + 2 t + (e & 1)
template <int BN, typename F>
__device__ __forceinline__ void for_each_out(const GemmArgs& a, int m0, int row0, int t, F&& f) {
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int m = m0 + 8 * j + 2 * t + c;
      if (m >= a.M) continue;
      if (row0 < a.N) f(4 * j + c, m, row0);
      if (row0 + 8 < a.N) f(4 * j + 2 + c, m, row0 + 8);
    }
}

// The block's output tile out[m0 .. m0 + BN - 1, n0 .. n0 + OC - 1] (+ bias, GLU) through shared memory
// stage (free once every wgmma is done): first each lane's accumulators, acc[4 j + e] = weight row
// 16 (tile0 + warp) + g + 8 (e >> 1), x row m0 + 8 j + 2 t + (e & 1), as T in [x row][column] order, then
// 16-byte stores along out's rows. (Stored straight from the fragments, 8 lanes wrote 16 bytes per x
// row, half of every 32-byte sector: ncu's top finding on the kernel; staged, it ran the same time,
// round 8, and the bounds are tested once per 16-byte chunk.)
template <typename T, int BN, int WG, int WS>
__device__ __forceinline__ void store_out(const GemmArgs& a, const float (&acc)[BN / 2], char* stage, int tile0,
                                          int m0, int warp, int g, int t) {
  constexpr int WR = 64 * WG;          // weight rows of the block
  constexpr int LD = WR + 8;           // staged row stride (elements): x rows 2 apart fall 8 banks apart
  const int oc = a.glu ? WR / 2 : WR;  // output columns of the block
  const int n0 = tile0 * (a.glu ? 8 : 16), nout = a.glu ? a.N / 2 : a.N;
  const int row0 = (tile0 + warp) * 16 + g;
  float b0 = 0.f, b1 = 0.f;
  if (a.bias != nullptr) {
    if (row0 < a.N) b0 = a.bias[row0];
    if (row0 + 8 < a.N) b1 = a.bias[row0 + 8];
  }
  if (a.accum) {  // fp32 out += y straight from the fragments: each element is this lane's alone
    float* o = reinterpret_cast<float*>(a.out);
    for_each_out<BN>(a, m0, row0, t,
                     [&](int i, int m, int row) { o[m * a.stride_om + row] += acc[i] + (i & 2 ? b1 : b0); });
    return;
  }
  T* st = reinterpret_cast<T*>(stage);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      T* r = st + (8 * j + 2 * t + c) * LD;
      const float y0 = acc[4 * j + c] + b0, y1 = acc[4 * j + 2 + c] + b1;
      if (a.glu) {  // rows g (gate) and g + 8 (up) of the tile: output column 8 tile + g
        r[warp * 8 + g] = Num<T>::from(y0 / (1.f + __expf(-y0)) * y1);
      } else {
        r[warp * 16 + g] = Num<T>::from(y0);
        r[warp * 16 + g + 8] = Num<T>::from(y1);
      }
    }
  }
  consumers_sync<WG, WS>();
  T* out = reinterpret_cast<T*>(a.out);
  const bool vec = (a.stride_om % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int cpr = oc / 8;  // 16-byte chunks per x row
  for (int i = threadIdx.x; i < BN * cpr; i += WS ? 128 * WG : blockDim.x) {
    const int xr = i / cpr, n = n0 + 8 * (i % cpr), m = m0 + xr;
    if (m >= a.M || n >= nout) continue;
    const T* src = st + xr * LD + 8 * (i % cpr);
    T* dst = out + static_cast<long long>(m) * a.stride_om + n;
    if (vec && n + 8 <= nout) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && n + e < nout; ++e) dst[e] = src[e];
    }
  }
}


// Split K: park this block's partial sums acc in a.part[blockIdx.z]; the last of the splits of the output
// tile to arrive (a counter per tile) then sums every split's partials in split order into acc (the same
// bits whichever arrives last) and returns true, the others false.
template <int BN, int WG, int WS>
__device__ __forceinline__ bool split_reduce(const GemmArgs& a, float (&acc)[BN / 2], int tile0, int m0, int warp,
                                             int g, int t) {
  __shared__ int last;
  const int row0 = (tile0 + warp) * 16 + g;
  const long long plane = static_cast<long long>(a.M) * a.N;
  float* mine = a.part + blockIdx.z * plane;
  for_each_out<BN>(a, m0, row0, t,
                   [&](int i, int m, int row) { mine[static_cast<long long>(m) * a.N + row] = acc[i]; });
  __threadfence();  // the partials visible device-wide before the counter says so
  consumers_sync<WG, WS>();
  if (threadIdx.x == 0) {
    int* cnt = a.sem + blockIdx.y * gridDim.x + blockIdx.x;
    last = atomicAdd(cnt, 1) == a.splits - 1;
    if (last) *cnt = 0;  // ready for the next launch
  }
  consumers_sync<WG, WS>();
  if (!last) return false;
  __threadfence();
  for_each_out<BN>(a, m0, row0, t, [&](int i, int m, int row) {
    float s = 0.f;
    for (int z = 0; z < a.splits; ++z) s += __ldcg(a.part + z * plane + static_cast<long long>(m) * a.N + row);
    acc[i] = s;
  });
  return true;
}

// One step's codes (BITS uint4 per lane) and its NG groups' coefficients (rows g, g + 8) of the lane's tile
// from shared memory (a slot of gemm_kernel's code ring: BITS x 32 uint4 of codes, then NG x 8 float4 of
// coefficients), -1024 s folded into the zero terms (dequant_slab).
template <int BITS, int NG>
__device__ __forceinline__ void lds_step(uint32_t src, int lane, int g, uint32_t (&w)[4 * BITS], float4 (&cf)[NG]) {
#pragma unroll
  for (int j = 0; j < BITS; ++j)
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[4 * j]), "=r"(w[4 * j + 1]), "=r"(w[4 * j + 2]), "=r"(w[4 * j + 3])
                 : "r"(src + (j * 32 + lane) * 16));
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(cf[j].x), "=f"(cf[j].y), "=f"(cf[j].z), "=f"(cf[j].w)
                 : "r"(src + BITS * 512 + (j * 8 + g) * 16));
    cf[j].y = fmaf(-1024.f, cf[j].x, cf[j].y);
    cf[j].w = fmaf(-1024.f, cf[j].z, cf[j].w);
  }
}

// y [M, N] = x [M, K] W^T (+ bias), or silu(gate) * up [M, N/2] (glu), or out [M, N] += x W^T (accum).
// grid (cdiv(M, BN), cdiv(#tiles, 4 WG), splits), block 128 WG: block z takes the z-th of splits ranges of
// K's steps (split_reduce adds them; BN <= QLB_GEMM_SPLIT_ROWS only); warpgroup wg takes the 64 rows of tiles
// 4 (WG y + wg) .. +3 (warp w: tile 4 WG y + w) against BN rows of x. Blocks along x share one block of
// weights and run side by side, so it is read from HBM about once. The K loop runs over k-blocks of
// 16 KBS columns; a k-block's KBS wgmmas are issued back to back while the next k-block's A fragments
// are dequantized into the other half of a register double buffer.
// Every load is a bulk copy (cp.async.bulk) that one thread asks for, completing on the slot's mbarrier:
// x's k-blocks (its image: a k-block of BN rows is one contiguous run per 64-column atom, landing in the
// 128-byte swizzle) in an NS-slot ring, NS - 1 k-blocks ahead; the codes and coefficients of the block's
// tiles, a whole 256-column step per slot, in a ring of CS slots, CS steps ahead, read into registers
// (lds_step) a k-block before the step starts. Against cp.async of x in slab order (16-byte copies with
// per-thread addresses and row predicates, codes loaded from global memory a k-block ahead; round 7),
// the loop lost half its instructions and LLaMA-7B shapes at M = 2048 ran 1.10-1.38x faster (H200,
// round 8). L2S: log2 of the spans of 32 columns per group, capped at 3 (one group per step or more).
// WS (warp specialization; round 18): 0: thread 0 issues every copy after each k-block's __syncthreads, once
// every warp is done with the slot it refills. 1: one more warp (warp 4 WG) issues them, each once the consumers
// have released its slot on the slot's "empty" mbarrier (every consumer warp arrives: after the wgmma_wait that
// retires a k-block's x, after the lds_step that reads a step's codes); the consumers then meet at no barrier
// in the loop. 2: the same from a whole copy warpgroup, which hands its registers to the consumers (setmaxnreg),
// so wide blocks keep theirs (one copy warp caps every thread of a 256-row block at 168: it spills).
template <int WG, int WS>
constexpr int gemm_threads() { return 128 * WG + (WS == 2 ? 128 : WS ? 32 : 0); }
// WS == 2: registers per thread at launch (ptxas: the warps of MINB blocks over the SM's 4 register files of
// 16384), then the copy warpgroup gives all but 40 back (setmaxnreg.dec) and the consumers take them (setmaxnreg.inc)
// (0: no reconfiguration, the launch already gives the consumers 232 or more)
template <int WG, int MINB>
__host__ __device__ constexpr int ws_consumer_regs() {
  constexpr int base = 16384 / (32 * ((4 * (WG + 1) * MINB + 3) / 4)) / 8 * 8;
  constexpr int c = (base * (WG + 1) - 40) / WG / 8 * 8;
  return base >= 232 ? 0 : c > 232 ? 232 : c;
}
// blocks per SM the kernel is compiled for (__launch_bounds__' minimum)
template <int BN, int WG, int WS, int L2S>
__host__ __device__ constexpr int gemm_min_blocks() { return BN <= 32 && WG == 1 ? (L2S >= 1 && !WS ? 4 : 3) : 1; }
template <typename T, int BITS, int BN, int WG, int KBS, int NS, int CS, int WS, int L2S>
__global__ void __launch_bounds__(gemm_threads<WG, WS>(), gemm_min_blocks<BN, WG, WS, L2S>())
    gemm_kernel(const GemmArgs a) {
  constexpr int NG = L2S >= 3 ? 1 : 8 >> L2S;  // groups per step
  constexpr int SLOT = BN * KBS * 32;          // bytes of one k-block of x
  constexpr int KBPS = 16 / KBS;               // k-blocks per step
  constexpr int TPB = 4 * WG;                  // tiles per block
  constexpr int TSLOT = BITS * 512 + NG * 128; // one tile's codes + coefficients of a step
  constexpr int CSLOT = TPB * TSLOT;
  static_assert(KBS % 4 == 0 && 16 % KBS == 0 && KBS <= 8 && NS >= 3, "KBS: 4 or 8; NS >= 3");
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t cring = smem + NS * SLOT, bars = cring + CS * CSLOT;  // x ring, code ring, mbarriers
  const uint32_t empties = bars + 8 * (NS + CS);  // WS: the slots' empty mbarriers, in the same order
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BN, tile0 = blockIdx.y * TPB;
  // split K: blockIdx.z takes steps s0 .. s0 + ns - 1 of the S (the ring's step and k-block indices count from s0)
  // (compiled in only for blocks of up to QLB_GEMM_SPLIT_ROWS x rows: at 256 rows the extra indices cost ~30
  // registers, round 9)
  constexpr bool SPLIT = BN <= QLB_GEMM_SPLIT_ROWS;
  const int s0 = SPLIT ? blockIdx.z * a.S / a.splits : 0, ns = SPLIT ? (blockIdx.z + 1) * a.S / a.splits - s0 : a.S;
  const int nkb = ns * KBPS;
  const uint32_t xbytes = static_cast<uint32_t>(min(BN, a.Mp - m0)) * 128;  // per atom: rows past Mp stay stale

  auto load_x = [&](int kb) {  // k-block kb into slot kb % NS
    const uint32_t bar = bars + 8 * (kb % NS);
    mbar_expect_tx(bar, KBS / 4 * xbytes);
#pragma unroll
    for (int at = 0; at < KBS / 4; ++at)
      bulk_copy(smem + (kb % NS) * SLOT + at * BN * 128,
                reinterpret_cast<const T*>(a.x) +
                    (static_cast<long long>((s0 * KBPS + kb) * (KBS / 4) + at) * a.Mp + m0) * 64,
                xbytes, bar);
  };
  auto load_codes = [&](int s) {  // step s of the block's tiles into slot s % CS
    const uint32_t bar = bars + 8 * (NS + s % CS), dst = cring + (s % CS) * CSLOT;
    const int g0 = ((s0 + s) * 8) >> a.log2_spg;
    mbar_expect_tx(bar, CSLOT);
#pragma unroll
    for (int j = 0; j < TPB; ++j) {
      const int tl = min(tile0 + j, a.ntiles - 1);  // tiles past the last re-read it and store nothing
      bulk_copy(dst + j * TSLOT, a.tiles + (static_cast<size_t>(tl) * a.S + s0 + s) * BITS * 32, BITS * 512, bar);
      bulk_copy(dst + j * TSLOT + BITS * 512, a.coef + (static_cast<size_t>(tl) * a.Lp + g0) * 8, NG * 128, bar);
    }
  };
  const bool leader = threadIdx.x == 0;
  if (leader) {
#pragma unroll
    for (int i = 0; i < NS + CS; ++i) mbar_init(bars + 8 * i, 1);
    if constexpr (WS) {
#pragma unroll
      for (int i = 0; i < NS + CS; ++i) mbar_init(empties + 8 * i, 4 * WG);
    }
    mbar_init_fence();
  }
  __syncthreads();
  constexpr int MINB = gemm_min_blocks<BN, WG, WS, L2S>();
  if constexpr (WS == 2 && ws_consumer_regs<WG, MINB>() > 0) {
    if (warp >= 4 * WG) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(ws_consumer_regs<WG, MINB>()));
  }
  if constexpr (WS) {
    if (warp >= 4 * WG) {  // the copy warp(s): lane 0 of the first issues every load, in the shipped order
      if (warp == 4 * WG && lane == 0) {
        for (int i = 0; i < NS - 1 && i < nkb; ++i) load_x(i);
        for (int i = 0; i < CS && i < ns; ++i) load_codes(i);
        for (int kb = 0; kb < nkb; ++kb) {
          const int s = kb / KBPS, kbl = kb % KBPS;
          if (kb + NS - 1 < nkb) {  // into k-block kb - 1's slot (slot NS - 1 is still unused at kb = 0)
            if (kb >= 1) mbar_wait(empties + 8 * ((kb - 1) % NS), ((kb - 1) / NS) & 1);
            load_x(kb + NS - 1);
          }
          if (kb == 0 && CS < ns) {  // into step 0's slot
            mbar_wait(empties + 8 * NS, 0);
            load_codes(CS);
          }
          if (kbl + 2 == KBPS && s + 1 + CS < ns) {  // into step s + 1's slot
            mbar_wait(empties + 8 * (NS + (s + 1) % CS), ((s + 1) / CS) & 1);
            load_codes(s + 1 + CS);
          }
        }
      }
      return;  // every load it issued is waited on by the consumers before they finish
    }
  } else if (leader) {
    for (int i = 0; i < NS - 1 && i < nkb; ++i) load_x(i);
    for (int i = 0; i < CS && i < ns; ++i) load_codes(i);
  }

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  acc_fence(acc);
  uint32_t w[4 * BITS];
  float4 cf[NG];
  uint32_t av[2][KBS][4];
  // (WS) the warp's lanes have read a code slot: lane 0 releases it
  auto release_codes = [&](int c) {
    if constexpr (WS) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empties + 8 * (NS + c));
    }
  };
  mbar_wait(bars + 8 * NS, 0);
  lds_step<BITS, NG>(cring + warp * TSLOT, lane, g, w, cf);
  release_codes(0);
  dequant_block<T, BITS, KBS, L2S>(w, cf, 0, av[0]);

  for (int s = 0; s < ns; ++s) {
#pragma unroll
    for (int kbl = 0; kbl < KBPS; ++kbl) {
      const int kb = s * KBPS + kbl;
      mbar_wait(bars + 8 * (kb % NS), (kb / NS) & 1);
      issue_kblock<T, BN, KBS>(acc, av[kbl & 1], smem + (kb % NS) * SLOT);
      if (kbl + 1 < KBPS || s + 1 < ns) {
        wgmma_wait<1>();
        if (WS && kb >= 1 && lane == 0) mbar_arrive(empties + 8 * ((kb - 1) % NS));  // k-block kb - 1 retired
        dequant_block<T, BITS, KBS, L2S>(w, cf, ((kbl + 1) % KBPS) * KBS, av[(kbl + 1) & 1]);
        if (kbl + 2 == KBPS && s + 1 < ns) {  // the step's last k-block decoded: the next step's codes
          const int c = (s + 1) % CS;
          mbar_wait(bars + 8 * (NS + c), ((s + 1) / CS) & 1);
          lds_step<BITS, NG>(cring + c * CSLOT + warp * TSLOT, lane, g, w, cf);
          release_codes(c);
        }
      }
      if constexpr (!WS) {
        // every warpgroup is past k-block kb - 1's wgmmas (its slot takes k-block kb + NS - 1) and, at the
        // step's k-block KBPS - 2, past reading step s + 1's codes (their slot takes step s + 1 + CS). (Per-slot
        // "empty" mbarriers instead, each warp releasing a slot and only the copying thread waiting: the same
        // time in one run, 5-12% slower than this across runs; round 8.)
        __syncthreads();
        if (leader) {
          if (kb + NS - 1 < nkb) load_x(kb + NS - 1);
          if (kb == 0 && CS < ns) load_codes(CS);  // step 0's slot, read before the loop
          if (kbl + 2 == KBPS && s + 1 + CS < ns) load_codes(s + 1 + CS);
        }
      }
    }
  }
  wgmma_wait<0>();
  acc_fence(acc);
  if constexpr (SPLIT) {
    if (a.splits > 1 && !split_reduce<BN, WG, WS>(a, acc, tile0, m0, warp, g, t)) return;
  }
  static_assert(BN * (64 * WG + 8) * sizeof(T) <= NS * SLOT + CS * CSLOT, "the output tile must fit the rings");
  consumers_sync<WG, WS>();  // every warpgroup's wgmmas are done: the rings take the output tile
  store_out<T, BN, WG, WS>(a, acc, smem_raw + (smem - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw))), tile0,
                       m0, warp, g, t);
}

// x [M, K] (16-bit, rows 16-byte aligned, K % 8 == 0) -> its image for gemm_kernel, T [A, Mp, 64]
// (A = 4 S atoms of 64 columns, Mp = M rounded up to 8, zeros past M and K): row r of atom at holds
// x's columns 64 at .. + 63 in slab order (within 32 columns, 4-byte word 4 t + d -> chunk d, word t),
// its 16-byte chunk c stored at c ^ (r % 8), as the 128-byte swizzle puts it in shared memory
// (desc_sw128). A block moves 32 rows x 8 atoms through shared memory: 16-byte loads along x's rows,
// 16-byte stores along each atom's 4 KB (a thread per row and atom, its 128 bytes in registers, ran
// 1.2-1.6 TB/s on an H200, round 8). Internal linkage: every GEMM unit includes it, one launches it.
static __global__ void __launch_bounds__(256) x_image_kernel(const uint4* __restrict__ x, uint4* __restrict__ out,
                                                             int M, int Mp, int K, long long stride16, int atoms) {
  __shared__ __align__(16) uint32_t tile[32][8 * 32 + 4];  // 32 rows x 8 atoms x 32 words; + 4: rows 4 banks apart
  const int r0 = blockIdx.x * 32, a0 = blockIdx.y * 8;
#pragma unroll
  for (int k = 0; k < 8; ++k) {  // chunk i of the block: row i / 64, chunk i % 64 of its 8 atoms
    const int i = threadIdx.x + 256 * k, r = i / 64, c = i % 64, row = r0 + r, col = (a0 * 8 + c) * 8;
    const uint4 v = row < M && col < K ? x[row * stride16 + col / 8] : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(&tile[r][4 * c]) = v;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 8; ++k) {  // output chunk i: atom i / 256, row (i / 8) % 32, stored chunk i % 8
    const int i = threadIdx.x + 256 * k, a = i / 256, r = (i / 8) % 32, cs = i % 8, row = r0 + r;
    if (row >= Mp || a0 + a >= atoms) continue;
    const int c = cs ^ (row & 7), h = c >> 2, d = c & 3;  // logical chunk c: words d of source chunks 4 h + t
    const uint32_t* sw = &tile[r][32 * a + 16 * h + d];
    out[(static_cast<long long>(a0 + a) * Mp + row) * 8 + cs] = make_uint4(sw[0], sw[4], sw[8], sw[12]);
  }
}

}  // namespace qlb

#if defined(QLB_TU_BITS) && defined(QLB_TU_GEMM)
namespace {

// Block shapes the launcher can take, by index (benchmarks/gemm_ab.py sweeps them):
//   X(index, BN x rows, WG warpgroups (64 weight rows each), KBS slabs per k-block, NS x ring slots,
//     CS code ring slots (steps), WS copy warps (gemm_kernel))
// WS: the fastest of 0 / 1 / 2 per block shape on an H100 (RESULTS round 18, LLaMA-7B shapes, 4 bit g128, µs,
// WS 0 -> this one): 32 rows, M = 32: qkv 31.6 -> 26.3, o 28.4 -> 22.6, down 47.8 -> 39.0 (2 splits); 64 rows
// one warpgroup, M = 32: qkv 34.4 -> 31.9, gate_up 64.6 -> 51.3; 128 rows, M = 512: o 44.5 -> 40.7, down 111.4 ->
// 100.3; 64 rows two warpgroups, M = 256: o 39.2 -> 35.9, down 96.6 -> 87.0. At 256 rows both lose 6-20%.
#ifndef QLB_GEMM_CONFIGS
#define QLB_GEMM_CONFIGS(X) \
  X(0, 256, 2, 4, 4, 2, 0)  \
  X(1, 128, 2, 8, 4, 2, 1)  \
  X(2, 256, 2, 4, 3, 2, 0)  \
  X(3, 64, 2, 8, 4, 2, 1)   \
  X(4, 32, 1, 8, 4, 4, 2)   \
  X(5, 64, 1, 8, 4, 4, 1)
#endif

template <typename T, int BN, int WG, int KBS, int NS, int CS, int WS, int L2S>
bool launch_gemm_kernel(const qlb::GemmArgs& a, char* err) {
  constexpr int BITS = QLB_TU_BITS;
  constexpr int ng = L2S >= 3 ? 1 : 8 >> L2S;  // groups per step
  const int smem = NS * BN * KBS * 32 + 1024           // x ring + alignment of the swizzle atoms
                   + CS * 4 * WG * (BITS * 512 + ng * 128)  // code ring
                   + (NS + CS) * (WS ? 16 : 8);              // mbarriers (full, and empty with WS)
  const dim3 grid((a.M + BN - 1) / BN, (a.ntiles + 4 * WG - 1) / (4 * WG), a.splits);
  const dim3 block(qlb::gemm_threads<WG, WS>());
  QLB_CHECK(err, grid.y <= 65535, "gemm: too many weight rows for one launch");
  QLB_CHECK(err, a.splits == 1 || BN <= QLB_GEMM_SPLIT_ROWS,
            "gemm: split K is built for blocks of up to %d x rows, not %d", QLB_GEMM_SPLIT_ROWS, BN);
  QLB_CHECK(err, a.splits == 1 || static_cast<long long>(grid.x) * grid.y <= a.nsem,
            "gemm: split K needs %lld counters, sem has %lld", static_cast<long long>(grid.x) * grid.y,
            static_cast<long long>(a.nsem));
  const auto kern = qlb::gemm_kernel<T, BITS, BN, WG, KBS, NS, CS, WS, L2S>;
  int dyn_max = 0;
  if (!smem_optin(reinterpret_cast<const void*>(kern), dyn_max, err)) return false;
  QLB_CHECK(err, smem <= dyn_max, "gemm needs %d bytes of shared memory, the device allows %d", smem, dyn_max);
  kern<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  return true;
}

// The copy form of a block shape whose own is WS_OWN, at log2 spans per group L2S: its own at groups of 128
// columns or more (L2S >= 2), where it was measured; groups of 32 and 64 copy from thread 0 (WS = 0), since with
// a copy warp(group) two shapes spill there (ptxas: 32 x rows at groups of 32, 192 bytes; 128 x rows at 32 and 64,
// 172 and 12 bytes). QLB_GEMM_WS >= 0 overrides both.
constexpr int copy_form(int ws_own, int l2s) { return QLB_GEMM_WS >= 0 ? QLB_GEMM_WS : l2s >= 2 ? ws_own : 0; }

template <typename T, int BN, int WG, int KBS, int NS, int CS, int WS_OWN>
bool launch_gemm_cfg(const qlb::GemmArgs& a, char* err) {
#ifdef QLB_GEMM_L2S_ONLY  // benchmarks sweeping many block shapes: one group size, a quicker build
  QLB_CHECK(err, std::min(a.log2_spg, 3) == QLB_GEMM_L2S_ONLY, "gemm: built for log2_spg %d only", QLB_GEMM_L2S_ONLY);
  return launch_gemm_kernel<T, BN, WG, KBS, NS, CS, copy_form(WS_OWN, QLB_GEMM_L2S_ONLY), QLB_GEMM_L2S_ONLY>(a, err);
#else
  switch (std::min(a.log2_spg, 3)) {
    case 0: return launch_gemm_kernel<T, BN, WG, KBS, NS, CS, copy_form(WS_OWN, 0), 0>(a, err);
    case 1: return launch_gemm_kernel<T, BN, WG, KBS, NS, CS, copy_form(WS_OWN, 1), 1>(a, err);
    case 2: return launch_gemm_kernel<T, BN, WG, KBS, NS, CS, copy_form(WS_OWN, 2), 2>(a, err);
    default: return launch_gemm_kernel<T, BN, WG, KBS, NS, CS, copy_form(WS_OWN, 3), 3>(a, err);
  }
#endif
}

bool launch_gemm(const qlb::GemmArgs& a, int cfg, char* err) {
  switch (cfg) {
#define QLB_GEMM_CASE(I, BN, WG, KBS, NS, CS, WS) \
  case I: return launch_gemm_cfg<QLB_TU_GEMM, BN, WG, KBS, NS, CS, WS>(a, err);
    QLB_GEMM_CONFIGS(QLB_GEMM_CASE)
#undef QLB_GEMM_CASE
    default: return fail(err, "gemm: no block shape %d", cfg);
  }
}

}  // namespace

// One translation unit per bit width and activation type (QLB_TU_GEMM, named by QLB_TU_GEMM_NAME):
// xs: x's image [4 S, Mp, 64] (x_image); m: x's rows; out [M, N] (or [M, N / 2] with glu), x's dtype, or
// fp32 [M, N] receiving out += x W^T (accum); splits > 1: K cut in that many ranges, part fp32 [splits, M, N]
// and sem int32 [blocks] zeroed (gpu_matmul._split_workspace)
namespace {
bool run_gemm(const torch::Tensor& xs, const torch::Tensor& tiles, const torch::Tensor& coef, const torch::Tensor& bias,
              torch::Tensor& out, int64_t m, int64_t n, int64_t log2_spg, bool glu, int64_t cfg, bool accum,
              int64_t splits, const torch::Tensor& part, const torch::Tensor& sem, char* err) {
  QLB_CHECK(err, xs.is_contiguous() && xs.dim() == 3 && xs.size(0) == tiles.size(1) * 4 &&
                  xs.size(1) == (m + 7) / 8 * 8 && xs.size(2) == 64,
            "gemm: x's image must be a contiguous [%lld, %lld, 64] (x_image)",
            static_cast<long long>(tiles.size(1) * 4), static_cast<long long>((m + 7) / 8 * 8));
  QLB_CHECK(err, reinterpret_cast<uintptr_t>(xs.data_ptr()) % 16 == 0, "gemm: x's image must be 16-byte aligned");
  QLB_CHECK(err, out.size(0) == m, "gemm: out must have %lld rows", static_cast<long long>(m));
  QLB_CHECK(err, !accum || (out.scalar_type() == at::kFloat && !glu), "gemm: accum takes an fp32 out and no glu");
  QLB_CHECK(err, splits >= 1 && splits <= tiles.size(1), "gemm: 1..%lld splits of K, not %lld",
            static_cast<long long>(tiles.size(1)), static_cast<long long>(splits));
  QLB_CHECK(err, splits == 1 || (part.scalar_type() == at::kFloat && part.numel() >= splits * m * n &&
                                 sem.scalar_type() == at::kInt),
            "gemm: split K needs fp32 part [splits, M, N] and int32 sem");
  qlb::GemmArgs a;
  a.x = xs.data_ptr();
  a.tiles = reinterpret_cast<const uint4*>(tiles.data_ptr());
  a.coef = reinterpret_cast<const float4*>(coef.data_ptr());
  a.bias = bias.numel() > 0 ? static_cast<const float*>(bias.data_ptr()) : nullptr;  // fp32: the binding's check
  a.out = out.data_ptr();
  a.M = m; a.Mp = (m + 7) / 8 * 8; a.N = n; a.S = tiles.size(1); a.Lp = coef.size(1); a.log2_spg = log2_spg;
  a.ntiles = tiles.size(0);
  a.stride_om = out.stride(0);
  a.glu = glu;
  a.accum = accum;
  a.splits = splits;
  a.part = splits > 1 ? static_cast<float*>(part.data_ptr()) : nullptr;  // types checked above
  a.sem = splits > 1 ? static_cast<int*>(sem.data_ptr()) : nullptr;
  a.nsem = sem.numel();
  return launch_gemm(a, cfg, err) && launch_error(err);
}
}  // namespace

void QLB_CAT(QLB_CAT(gemm_b, QLB_TU_BITS), QLB_TU_GEMM_NAME)(torch::Tensor xs, torch::Tensor tiles, torch::Tensor coef,
                                                           torch::Tensor bias, torch::Tensor out, int64_t m, int64_t n,
                                                           int64_t log2_spg, bool glu, int64_t cfg, bool accum,
                                                           int64_t splits, torch::Tensor part, torch::Tensor sem,
                                                           char* err) {
  run_gemm(xs, tiles, coef, bias, out, m, n, log2_spg, glu, cfg, accum, splits, part, sem, err);
}

#ifdef QLB_TU_X_IMAGE  // one definition, in one translation unit
// x [M, K] (16-bit, unit column stride, 16-byte aligned rows, K % 8 == 0) -> out [A, Mp, 64], x_image_kernel
namespace {
bool run_x_image(const torch::Tensor& x, torch::Tensor& out, char* err) {
  QLB_CHECK(err, x.element_size() == 2 && out.element_size() == 2, "x_image: 16-bit x and out");
  QLB_CHECK(err, x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 && x.size(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
            "x_image: x must have unit column stride, K %% 8 == 0 and 16-byte aligned rows");
  const int m = x.size(0), k = x.size(1), mp = (m + 7) / 8 * 8, atoms = out.size(0);
  QLB_CHECK(err, out.is_contiguous() && out.dim() == 3 && out.size(1) == mp && out.size(2) == 64 && atoms * 64 >= k,
            "x_image: out must be a contiguous [A, Mp, 64] covering x");
  if (mp == 0 || atoms == 0) return true;
  QLB_CHECK(err, (atoms + 7) / 8 <= 65535, "x_image: too many columns for one launch");
  const dim3 grid((mp + 31) / 32, (atoms + 7) / 8);
  qlb::x_image_kernel<<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(x.data_ptr()), reinterpret_cast<uint4*>(out.data_ptr()), m, mp, k,
      x.stride(0) / 8, atoms);
  return launch_error(err);
}
}  // namespace

void gemm_x_image(torch::Tensor x, torch::Tensor out, char* err) { run_x_image(x, out, err); }
#endif
#endif
