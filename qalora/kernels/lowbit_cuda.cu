// Low-bit (2/3/4-bit, float zeros) GEMV/skinny-GEMM and dequant kernels for the tile layout of
// qalora/kernels/layout.py. Compiled at first use by qalora/kernels/cuda_ext.py (load_inline).
//
// Layout (per 16-row tile T and 256-column step S, one warp-load of BITS x 16 bytes per lane):
//   tiles  uint4 [T, S, BITS, 32]   lane L = 4g + t holds 128 codes = 64 "pairs" (two codes of
//                                   one row at adjacent columns) in 4*BITS words
//   coef   float4 [T, Lp, 8]        {s[row g], -s*z[row g], s[row g+8], -s*z[row g+8]} per group
// Pair p = 8*sp + 4*f + i (span sp of 32 columns, mma fragment f, A register i) is row
// 16T + g + 8*(i&1), columns 256S + 32sp + 8t + 4f + 2*(i>>1) + {0, 1}. That is exactly the
// m16n8k16 A-fragment of lane L when the B fragment (activations) of lane L is the 8 *contiguous*
// columns 32sp + 8t .. +7 (one 16-byte load), so x needs no permutation.
//
// Codes become fp16/bf16 without conversions: OR-ing a code into the low mantissa bits of 1024.0
// (fp16, 0x6400) or 128.0 (bf16, 0x4300) gives OFF + q exactly, one LOP3 per two codes. The mma
// accumulates P' = sum x (q + OFF) in fp32 per group; the group epilogue applies the fp32
// coefficients: y += s * (P' - OFF * X) + (-s z) * X = s * P' + (-s z - OFF s) * X with X = sum x
// over the group.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace qlb {

template <typename T> struct Num;
template <> struct Num<__half> {
  static constexpr uint32_t magic = 0x64006400u;  // 1024.0 in both halves
  static constexpr float off = 1024.f;
  static constexpr uint32_t one2 = 0x3c003c00u;  // 1.0 in both halves
  __device__ static float2 f2(uint32_t u) { return __half22float2(*reinterpret_cast<__half2*>(&u)); }
  __device__ static uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __half from(float a) { return __float2half_rn(a); }
};
template <> struct Num<__nv_bfloat16> {
  static constexpr uint32_t magic = 0x43004300u;  // 128.0 in both halves
  static constexpr float off = 128.f;
  static constexpr uint32_t one2 = 0x3f803f80u;
  __device__ static float2 f2(uint32_t u) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u)); }
  __device__ static uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __nv_bfloat16 from(float a) { return __float2bfloat16_rn(a); }
};

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Weight codes are read once: stream them past L1 (the dequant kernel; the GEMV copies them
// with cp.async.cg, which bypasses L1 too).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(gmem) : "memory");
}
// An L2 "evict first" policy (a createpolicy handle) for cp_async16_hint: for data read once
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ void cp_async16_hint(void* smem, const void* gmem, uint64_t l2_policy) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(a), "l"(gmem), "l"(l2_policy)
               : "memory");
}
template <bool EVICT>
__device__ __forceinline__ void copy16(void* smem, const void* gmem, uint64_t l2_policy) {
  if constexpr (EVICT) cp_async16_hint(smem, gmem, l2_policy);
  else cp_async16(smem, gmem);
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most N of this thread's cp.async groups are pending (N is 0..3)
__device__ __forceinline__ void cp_wait_pending(int n) {
  if (n <= 0) asm volatile("cp.async.wait_group 0;" ::: "memory");
  else if (n == 1) asm volatile("cp.async.wait_group 1;" ::: "memory");
  else if (n == 2) asm volatile("cp.async.wait_group 2;" ::: "memory");
  else asm volatile("cp.async.wait_group 3;" ::: "memory");
}

// Programmatic dependent launch (sm_90): the next kernel on the stream may start once every block
// of this one has triggered; griddepcontrol.wait then blocks until this whole grid has finished and
// its writes are visible. Both are no-ops for a kernel launched without the attribute.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// (a & MASK) | c as one LOP3. Written in C++ with both constants as immediates, ptxas emits two
// (a LOP3 takes one immediate): half of the unpacking instructions of a step (SASS, round 4).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));
  return d;
}

// Pair P of a lane's step (64 pairs in 4*BITS words) as two 16-bit floats OFF + q, given MAGIC.
// P is a compile-time constant after unrolling, so every shift and word index is an immediate.
template <int BITS>
__device__ __forceinline__ uint32_t pair(const uint32_t* w, int P, uint32_t magic) {
  if (BITS == 4) return and_or<0x000f000fu>(w[P >> 2] >> (4 * (P & 3)), magic);
  if (BITS == 2) return and_or<0x00030003u>(w[P >> 3] >> (2 * (P & 7)), magic);
  if (P < 60) return and_or<0x00070007u>(w[P / 5] >> (3 * (P % 5)), magic);
  // 3 bit, pairs 60..63: bit b of each code sits in bit 15 (low code) / 31 (high code) of word 3j+b
  const int j = P - 60;
  return ((w[3 * j] >> 15) & 0x00010001u) | ((w[3 * j + 1] >> 14) & 0x00020002u) |
         ((w[3 * j + 2] >> 13) & 0x00040004u) | magic;
}

// pair() for the GEMV's mma. At 2 bit an odd pair (the A register of rows g + 8) is read from the
// shift of the even pair before it, masked one code higher: OFF + 4q, exact in fp16 and bf16. One
// shift per two pairs instead of two (SASS, step loop at M = 1: ~60 fewer of ~450 instructions); the
// group epilogue divides those rows' scale by ODD_ROWS.
template <int BITS>
__device__ __forceinline__ uint32_t pair_mma(const uint32_t* w, int P, uint32_t magic) {
  if (BITS != 2) return pair<BITS>(w, P, magic);
  const uint32_t v = w[P >> 3] >> (2 * (P & 6));
  return (P & 1) ? and_or<0x000c000cu>(v, magic) : and_or<0x00030003u>(v, magic);
}
template <int BITS>
constexpr float ODD_ROWS = BITS == 2 ? 4.f : 1.f;

enum Epi { STORE = 0, ACCUM = 1, GLU = 2 };

// The skinny kernel's arguments, in one struct that its device functions take by reference.
struct GemvArgs {
  const void* xv;        // x [M, K]: T, or fp32 with a norm weight
  const float* nw;       // RMSNorm weight [K] or null
  const uint4* tiles;    // codes, uint4 [T, S, BITS, 32]
  const float4* coef;    // float4 [T, Lp, 8]
  const float* bias;     // [N] or null
  void* outv;            // see Epi
  int M, N, K, S, Lp, log2_spg;
  long long stride_xm, stride_om;
  int epi;
  float eps;
  int nst;               // ring slots per warp
  int ring_off;          // uint4s of dynamic shared memory before the rings (the staged x)
  int ntiles;
};

// The norm's input written by one GEMV for the next (gpu_matmul.NextNorm): a kernel argument of its own, since
// in GemvArgs these fields made ptxas spill in the 4-fragment kernels, which sit at their 128-register cap.
struct NormIO {
  // NORM with x already multiplied by nw (T [M, K], as an ACCUM epilogue's xn_out wrote it): the sums of
  // squares of x's rows come as nss partials each, ss_in fp32 [M, nss]; null: x is fp32 and nw is applied here
  const float* ss_in;
  int nss;
  // ACCUM: also the next RMSNorm's input, for the GEMV after this one (null: not): xn_out T [M, N] =
  // (out + y) * nw_next, and ss_out fp32 [M, ntiles], per 16-row tile the sum of squares of out + y
  const float* nw_next;
  void* xn_out;
  float* ss_out;
};

// log2 of the 32-column spans per group: GS when the kernel is compiled for one group size (the
// group epilogue's spans are then known at compile time, no per-span test and branch), else the
// argument.
template <int GS>
__device__ __forceinline__ int spg_log2(const GemvArgs& a) { return GS >= 0 ? GS : a.log2_spg; }

// uint4s of one step's ring slot: the codes of R tiles, then their ng groups' coefficients.
template <int BITS, int R>
__device__ __forceinline__ int slot_u4(int ng) { return R * (BITS * 32 + ng * 8); }

// Queue one step's copies into slot d: lane L's code chunks of the R tiles (wsrc[r]: tile r's codes
// at this lane, step 0) and the tiles' coefficients for the step's groups (first lanes; tiles past
// the last re-read the last one, rmax = the last tile's index within the R). EVICT: the copies with the L2 policy
// pol (evict_first_policy), else with the default one.
template <int BITS, int R, int GS, bool EVICT>
__device__ __forceinline__ void issue_step(const GemvArgs& a, uint4* d, const uint4* const (&wsrc)[R],
                                           const float4* csrc, int rmax, int st, int lane, uint64_t pol) {
  const int l2 = spg_log2<GS>(a);
  const int log2_cpt = 6 - min(l2, 3);  // coefficient chunks per tile and step: ng * 8
  const int cpt_mask = (1 << log2_cpt) - 1;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < BITS; ++j) copy16<EVICT>(d + (r * BITS + j) * 32 + lane, wsrc[r] + (st * BITS + j) * 32, pol);
  }
  const int gb8 = ((st * 8) >> l2) * 8;
  for (int i = lane; i < (R << log2_cpt); i += 32)
    copy16<EVICT>(d + R * BITS * 32 + i, csrc + min(i >> log2_cpt, rmax) * a.Lp * 8 + gb8 + (i & cpt_mask), pol);
}

// Row stride of the staged x (SX), in elements: K rounded up to whole 256-column steps, zeros past K
// (so the inner loop reads x unpredicated), plus 32 so that rows g and g+1 of a quarter-warp's
// 16-byte loads fall in different banks.
__host__ __device__ __forceinline__ int sx_ld(int K) { return ((K + 255) & ~255) + 32; }

// One staged chunk with NORM from fp32 x: 8 columns of x * nw as T, and x's squares added to ssr[r] (past K,
// k >= K, the zeros add nothing).
template <typename T>
__device__ __forceinline__ uint4 norm_chunk(const float4 x0, const float4 x1, const float4 n0, const float4 n1, int r,
                                            bool in_k, float (&ssr)[8]) {
  if (in_k) {
    const float q = x0.x * x0.x + x0.y * x0.y + x0.z * x0.z + x0.w * x0.w + x1.x * x1.x + x1.y * x1.y + x1.z * x1.z +
                    x1.w * x1.w;
#pragma unroll
    for (int rr = 0; rr < 8; ++rr) ssr[rr] += rr == r ? q : 0.f;
  }
  uint4 v;
  v.x = Num<T>::pack(x0.x * n0.x, x0.y * n0.y);
  v.y = Num<T>::pack(x0.z * n0.z, x0.w * n0.w);
  v.z = Num<T>::pack(x1.x * n1.x, x1.y * n1.y);
  v.w = Num<T>::pack(x1.z * n1.z, x1.w * n1.w);
  return v;
}

// SX prologue: stage x (x * nw with NORM) as T in shared memory, row r at sx[r * ldx]; with NORM each
// warp's sums of squares per row go to rss_sx[warp][row], added later in a fixed order (with PRE and
// NormIO::ss_in: x is staged as it is and the sums are its partials'). Ends with a block barrier. U > 1: a
// thread issues the loads of U chunks before it uses any. One chunk per iteration (the trip count is known
// only at run time, so ptxas does not pipeline the loop) puts an L2 round trip per chunk on every block's
// path to its first step; the chunks are taken in the same order either way.
template <typename T, bool NORM, int U, bool PRE>
__device__ __forceinline__ void stage_x(const GemvArgs& a, const NormIO& io, T* sx, int ldx, float (*rss_sx)[8],
                                        int lane, int warp) {
  const int chunks = (ldx - 32) >> 3, total = a.M * chunks;
  const bool fp32x = NORM && (!PRE || io.ss_in == nullptr);  // x fp32, times nw here
  float ssr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // this thread's sums of squares per row
  const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
  // U == 1 keeps its own loop: the U-chunk form at U = 1 spills 12 B in two 2-bit kernels (ptxas, sm_90a, round 16).
  if constexpr (U == 1) {
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int r = idx / chunks, k = (idx - r * chunks) << 3;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);  // past K: zeros
      if (k < a.K && fp32x) {
        const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(a.xv) + r * a.stride_xm + k);
        const float4* nr = reinterpret_cast<const float4*>(a.nw + k);
        v = norm_chunk<T>(__ldg(xr), __ldg(xr + 1), __ldg(nr), __ldg(nr + 1), r, true, ssr);
      } else if (k < a.K) {
        v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(a.xv) + r * a.stride_xm + k));
      }
      *reinterpret_cast<uint4*>(sx + r * ldx + k) = v;
    }
  } else {
    for (int base = threadIdx.x; base < total; base += U * blockDim.x) {
      float4 xv[U][2], nv[U][2];  // fp32x: 8 columns of x and of nw
      uint4 raw[U];               // else: 8 columns of x as T
#pragma unroll
      for (int u = 0; u < U; ++u) {  // past K or past the last chunk: zeros
        const int idx = base + u * blockDim.x;
        const int r = idx / chunks, k = (idx - r * chunks) << 3;
        const bool in = idx < total && k < a.K;
        xv[u][0] = xv[u][1] = nv[u][0] = nv[u][1] = z4;
        raw[u] = make_uint4(0u, 0u, 0u, 0u);
        if (in && fp32x) {
          const float* xf = reinterpret_cast<const float*>(a.xv) + r * a.stride_xm + k;
          const float4* xr = reinterpret_cast<const float4*>(xf);
          const float4* nr = reinterpret_cast<const float4*>(a.nw + k);
          xv[u][0] = __ldg(xr);
          xv[u][1] = __ldg(xr + 1);
          nv[u][0] = __ldg(nr);
          nv[u][1] = __ldg(nr + 1);
        } else if (in) {
          raw[u] = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(a.xv) + r * a.stride_xm + k));
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + u * blockDim.x;
        if (idx >= total) break;
        const int r = idx / chunks, k = (idx - r * chunks) << 3;
        const uint4 v = fp32x ? norm_chunk<T>(xv[u][0], xv[u][1], nv[u][0], nv[u][1], r, k < a.K, ssr) : raw[u];
        *reinterpret_cast<uint4*>(sx + r * ldx + k) = v;
      }
    }
  }
  if (NORM && !fp32x) {  // the partials, each thread's in a fixed order
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (r >= a.M) break;
      for (int i = threadIdx.x; i < io.nss; i += blockDim.x) ssr[r] += io.ss_in[r * io.nss + i];
    }
  }
  if (NORM) {
#pragma unroll
    for (int rr = 0; rr < 8; ++rr) {
      if (rr >= a.M) break;
      float q = ssr[rr];
#pragma unroll
      for (int o = 16; o; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) rss_sx[warp][rr] = q;
    }
  }
  __syncthreads();
}

// One 256-column step s of R tiles from ring slot cur: P' per tile and group into tmp, the group sums
// of x into xsum, and at each group's end (or at slice_end, the last step this warp takes of these
// tiles) the group's coefficients into acc. x from the staged sx (SX) or from global memory.
// Without SX, x row 8 n + g of this lane starts at xo[n] elements (rows past M read row M - 1, as with SX: their
// outputs are never stored), and with KCHK (K not whole steps) the columns past K are zeros.
template <typename T, int BITS, int NT, bool SX, int R, int GS, bool KCHK>
__device__ __forceinline__ void step_mma(const GemvArgs& a, const uint4* cur, int s, bool slice_end, const T* sx,
                                         int ldx, const int (&xo)[NT], int lane, float (&acc)[R][NT][4],
                                         float (&tmp)[R][NT][4], float (&xsum)[NT][4]) {
  constexpr float OFF = Num<T>::off;
  const uint32_t ones[4] = {Num<T>::one2, Num<T>::one2, Num<T>::one2, Num<T>::one2};
  const int g = lane >> 2, t = lane & 3;
  const int l2 = spg_log2<GS>(a);
  const int spg_mask = (1 << l2) - 1;
  const int ng = l2 >= 3 ? 1 : 8 >> l2;  // groups per step
  const float4* scoef = reinterpret_cast<const float4*>(cur + R * BITS * 32);
#pragma unroll
  for (int sp = 0; sp < 8; ++sp) {
    const int span = s * 8 + sp;
    const int k = span * 32 + 8 * t;
    uint32_t b[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int row = 8 * n + g;
      if (SX) {
        // rows past M read row M - 1: the mma keeps x rows apart and their outputs are never stored;
        // columns past K are staged zeros
        const uint4 v = *reinterpret_cast<const uint4*>(sx + min(row, a.M - 1) * ldx + k);
        b[n][0] = v.x; b[n][1] = v.y; b[n][2] = v.z; b[n][3] = v.w;
      } else {
        // one address per step and fragment, the span's offset an immediate: a select per word and a bound
        // test per load were a fifth of the step loop at M = 8 (SASS: 575 -> 459 instructions; H200 decode at
        // batch 16: 4222 -> 5321 tok/s, benchmarks/RESULTS.md round 16)
        const T* xr = reinterpret_cast<const T*>(a.xv) + (xo[n] + s * 256) + sp * 32;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (!KCHK || k < a.K) v = __ldg(reinterpret_cast<const uint4*>(xr));
        b[n][0] = v.x; b[n][1] = v.y; b[n][2] = v.z; b[n][3] = v.w;
      }
    }
    // X = sum of the (rounded) activations, by the tensor cores: A = ones puts it straight into
    // the accumulator layout, and it is exactly what the OFF * X term must cancel; once for R tiles
#pragma unroll
    for (int f = 0; f < 2; ++f) {
#pragma unroll
      for (int n = 0; n < NT; ++n) mma(xsum[n], ones, b[n][2 * f], b[n][2 * f + 1], T());
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // the lane's code words of tile r (the ones span sp does not use are never loaded)
      uint32_t w[4 * BITS];
#pragma unroll
      for (int j = 0; j < BITS; ++j) {
        const uint4 v = cur[(r * BITS + j) * 32 + lane];
        w[4 * j] = v.x; w[4 * j + 1] = v.y; w[4 * j + 2] = v.z; w[4 * j + 3] = v.w;
      }
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        uint32_t av[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = pair_mma<BITS>(w, 8 * sp + 4 * f + i, Num<T>::magic);
#pragma unroll
        for (int n = 0; n < NT; ++n) mma(tmp[r][n], av, b[n][2 * f], b[n][2 * f + 1], T());
      }
    }
    if (((span + 1) & spg_mask) == 0 || (sp == 7 && slice_end)) {  // group (or slice) ends
      const int j = l2 >= 3 ? 0 : sp >> l2;                          // group within the step
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // {s, -s z} of rows g and g + 8 (8 distinct addresses per warp: broadcast reads)
        float4 c = scoef[(r * ng + j) * 8 + g];
        if (ODD_ROWS<BITS> != 1.f) c.z *= 1.f / ODD_ROWS<BITS>;  // exact: a power of two
        // s (P' - OFF X) + (-s z) X = s P' + (-s z - OFF s) X: two FMA per output, not four
        const float z0 = fmaf(-OFF, c.x, c.y), z1 = fmaf(-OFF, c.z, c.w);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[r][n][0] = fmaf(z0, xsum[n][0], fmaf(c.x, tmp[r][n][0], acc[r][n][0]));
          acc[r][n][1] = fmaf(z0, xsum[n][1], fmaf(c.x, tmp[r][n][1], acc[r][n][1]));
          acc[r][n][2] = fmaf(z1, xsum[n][2], fmaf(c.z, tmp[r][n][2], acc[r][n][2]));
          acc[r][n][3] = fmaf(z1, xsum[n][3], fmaf(c.z, tmp[r][n][3], acc[r][n][3]));
#pragma unroll
          for (int e = 0; e < 4; ++e) tmp[r][n][e] = 0.f;
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) xsum[n][e] = 0.f;
      }
    }
  }
}

// An ACCUM epilogue's second output: the next RMSNorm's input (NormIO::xn_out, ss_out) from the residual
// stream this tile's lanes just wrote (rows 16 tile + g + {0, 8}, x rows 8 n + 2 t + {0, 1}). The GEMV
// after this one then stages 16-bit x * nw and a few partial sums instead of fp32 x and nw: a block of
// 16 rows read 32 KB of L2 for 4 KB of weight at K = 4096 (benchmarks/RESULTS.md round 14). The 16 rows'
// squares are added by a butterfly over g, which leaves the same bits in every lane, run after run.
template <typename T>
__device__ __forceinline__ void next_norm_input(const GemvArgs& a, const NormIO& io, int tile, int n, int lane) {
  const int g = lane >> 2, t = lane & 3;
  float sq[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = 8 * n + 2 * t + c;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tile * 16 + g + 8 * h;
      if (col >= a.M || row >= a.N) continue;
      const float v = reinterpret_cast<const float*>(a.outv)[col * a.stride_om + row];  // this thread's own write
      reinterpret_cast<T*>(io.xn_out)[col * a.N + row] = Num<T>::from(v * io.nw_next[row]);
      sq[c] = fmaf(v, v, sq[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) sq[c] += __shfl_xor_sync(0xffffffffu, sq[c], o);
    const int col = 8 * n + 2 * t + c;
    if (g == 0 && col < a.M) io.ss_out[col * a.ntiles + tile] = sq[c];
  }
}

// The finished sums y of fragment n of one tile (rows 16 tile + g + {0, 0, 8, 8}, x rows 8 n + 2 t +
// {0, 1, 0, 1}; already scaled by 1/rms with NORM): plus bias, written per the epilogue.
template <typename T>
__device__ __forceinline__ void store_tile(const GemvArgs& a, const float (&y0)[4], int tile, int n, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int row0 = tile * 16 + g;
  float y[4] = {y0[0], y0[1], y0[2], y0[3]};
  if (a.bias != nullptr) {
    if (row0 < a.N) { y[0] += a.bias[row0]; y[1] += a.bias[row0]; }
    if (row0 + 8 < a.N) { y[2] += a.bias[row0 + 8]; y[3] += a.bias[row0 + 8]; }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = 8 * n + 2 * t + c;
    if (col >= a.M) continue;
    if (a.epi == GLU) {  // rows g (gate) and g + 8 (up) of this tile are gate/up of output 8*tile+g
      const int j = tile * 8 + g;
      if (j < a.N / 2) {
        const float gt = y[c], up = y[2 + c];
        reinterpret_cast<T*>(a.outv)[col * a.stride_om + j] = Num<T>::from(gt / (1.f + __expf(-gt)) * up);
      }
      continue;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row >= a.N) continue;
      if (a.epi == ACCUM) reinterpret_cast<float*>(a.outv)[col * a.stride_om + row] += y[2 * h + c];
      else reinterpret_cast<T*>(a.outv)[col * a.stride_om + row] = Num<T>::from(y[2 * h + c]);
    }
  }
}

// 1/rms of the x rows this lane's outputs belong to (e: 0..3 as in the mma accumulator; staged x, so
// fragment n = 0), from the staging warps' sums of squares rss[w][row], added in warp order.
__device__ __forceinline__ void scale_rms(const GemvArgs& a, float (&y)[4], const float (*rss)[8], int nwarps, int n,
                                          int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int col = 8 * n + 2 * t + (e & 1);
    float q = 0.f;
    if (col < 8) for (int w2 = 0; w2 < nwarps; ++w2) q += rss[w2][col];
    y[e] *= rsqrtf(q / a.K + a.eps);
  }
}

template <int R, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[R][NT][4]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][n][e] = 0.f;
    }
  }
}

// out[m, n] = sum_k x[m, k] W[n, k] for M <= 8*NT rows of x.
// grid: (cdiv(#tiles, R)), block: 32*W threads. A block takes R consecutive 16-row tiles; warp w
// takes steps [w*S/W, (w+1)*S/W) of all of them and the warps' partial sums are added in shared
// memory (split-K inside the block: no atomics, no workspace, and every output element is written
// by one thread, so ACCUM is a plain +=). R > 1: each activation fragment a warp loads (and its
// group sum, by the tensor cores) serves R tiles instead of one; at M = 32 without it every block
// re-read all of x [32, K] from L2 for 32 KB of weights (qkv: 196 MB of L2 reads for 25 MB of codes).
// NORM (with SX only): x is an fp32 residual stream [M, K]; the input is rmsnorm(x) * nw. 1/rms(x[m])
//   is a per-row factor, so the kernel stages x * nw for the mma and multiplies the result by it; the
//   block stages all of x[m] anyway, so the sum of squares comes for free.
// epi: STORE writes T [M, N]; ACCUM adds into fp32 [M, N]; GLU (rows interleaved gate/up in
//   blocks of 8, see layout.glu_row_perm) writes silu(gate) * up as T [M, N/2].
// SX (few rows, see SX_MAX_ROWS): the block first stages its activations in shared memory as T
//   (x * nw with NORM, the sums of squares alongside) while its first weight loads are in
//   flight; the inner loop then takes each B fragment with one shared load. Without SX every
//   span re-reads x from L1/L2 and, with NORM, re-does the fp32 multiply and convert: at M = 1
//   most of a warp-step's instructions (Nsight Compute, qkv 4 bit: issue-bound at 21% of DRAM
//   bandwidth, 0.44 instructions per cycle per scheduler with 3.4 warps resident).
// Blocks per SM: with R = 1 above NT = 1 two (128 registers); left free, ptxas took 212 at NT = 4 and one
// block per SM lost 1.4x (benchmarks/RESULTS.md, round 3). R = 2 at NT = 4 needs ~254. SX: three (80
// registers; at 64 round 6's straight-line step loop spilled), two at 3 bit (its 12 code words).
template <typename T, int BITS, int NT, bool NORM, bool SX, int R, int GS, bool KCHK = false>
__global__ void __launch_bounds__(256, SX ? (BITS == 3 ? 2 : 3) : (NT > 1 && R > 1 ? 1 : 2))
    gemv_kernel(const GemvArgs a, const NormIO io) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int tile0 = blockIdx.x * R;
  const int s0 = warp * a.S / nwarps, s1 = (warp + 1) * a.S / nwarps;
  const int l2 = spg_log2<GS>(a), ng = l2 >= 3 ? 1 : 8 >> l2;  // groups per step
  const int nst = a.nst;

  float acc[R][NT][4], tmp[R][NT][4], xsum[NT][4];
  zero_acc(acc);
  zero_acc(tmp);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) xsum[n][e] = 0.f;
  }

  // Weight codes and coefficients stream through a per-warp ring of NST shared-memory slots
  // filled by cp.async: NST - 1 steps are in flight while one is computed, at no register cost
  // (a register FIFO of the same depth took 48 registers at 4 bit and capped the SM at 2 blocks).
  // A slot holds the step's codes of the R tiles (lane L's own chunks), then their ng groups'
  // coefficients once each, 8 float4 per group and tile (copied by the first lanes): lanes read
  // each other's coefficients, so the warp syncs between the copies landing and the reads, and
  // before a slot is refilled. Tiles past the last (the grid is rounded up to R) re-read the last
  // tile and store nothing: their rows are >= N.
  extern __shared__ uint4 dyn_smem[];
  const int su4 = slot_u4<BITS, R>(ng);
  uint4* ring = dyn_smem + a.ring_off + (size_t)warp * nst * su4;
  // The step-invariant part of each tile's addresses, once: recomputed per step (64-bit products,
  // clamps) it was most of the ~250 instructions of a step's bookkeeping (SASS, round 4).
  const uint4* wsrc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wsrc[r] = a.tiles + (size_t)min(tile0 + r, a.ntiles - 1) * a.S * BITS * 32 + lane;
  const float4* csrc = a.coef + (size_t)tile0 * a.Lp * 8;
  const int rmax = a.ntiles - 1 - tile0;  // tiles after tile0
  // Unstaged x (batches of 3 or more at K = 4096): the weight copies evict first from L2, since they are read
  // once per decode step, so x, the KV cache and the partial sums stay. That gained 2.1-3.9% in decode at batch
  // 8-32, INT4 and INT2; with x staged (batch 1-2) the hinted copies lost 1-2% at batch 1 (H200, RESULTS round 19).
  constexpr bool EVICT = !SX;
  const uint64_t pol = EVICT ? evict_first_policy() : 0;
  // The next kernel may be scheduled once all of this grid's blocks are resident: its blocks then
  // issue their first weight loads while this one finishes. Up to pdl_wait a block reads only
  // weights, which no kernel writes; x and out belong to the kernels before it.
  pdl_trigger();
  for (int i = 0; i < nst - 1; ++i) {
    if (s0 + i < s1) issue_step<BITS, R, GS, EVICT>(a, ring + i * su4, wsrc, csrc, rmax, s0 + i, lane, pol);
    cp_commit();
  }
  pdl_wait();

  T* sx = reinterpret_cast<T*>(dyn_smem);
  const int ldx = sx_ld(a.K);
  __shared__ float rss_sx[8][8];  // [warp][row]: each warp's sums of squares, added in a fixed order
  // x chunks in flight per staging thread: 16 registers each with NORM (x and nw in fp32), 4 without. At 4 bit
  // only: at 2 bit, R = 2 and NORM ptxas then spilled in the step loop, and INT2 decode lost 2% at batch 1
  // (benchmarks/RESULTS.md round 14)
  constexpr int SU = BITS != 4 ? 1 : NORM ? 2 : 4;
  // x already times nw (NormIO::ss_in) at 4 bit only, the decoder's one use: at 2 bit with R = 2 its code
  // alone made ptxas spill 4 bytes in the step loop
  if (SX) stage_x<T, NORM, SU, BITS == 4>(a, io, sx, ldx, rss_sx, lane, warp);
  int xo[NT];  // without SX: where the lane's x rows start, in elements (< 2^31, launch_gemv checks)
#pragma unroll
  for (int n = 0; n < NT; ++n) xo[n] = min(8 * n + (lane >> 2), a.M - 1) * (int)a.stride_xm + 8 * (lane & 3);
  uint4* const ring_end = ring + nst * su4;
  uint4* slot = ring;                     // read this step
  uint4* fill = ring + (nst - 1) * su4;   // refilled this step: the one read last step
  for (int s = s0; s < s1; ++s) {
    __syncwarp();  // every lane is done with the slot read last step
    if (s + nst - 1 < s1) issue_step<BITS, R, GS, EVICT>(a, fill, wsrc, csrc, rmax, s + nst - 1, lane, pol);
    cp_commit();
    cp_wait_pending(nst - 1);  // this step's group has landed
    __syncwarp();              // ... for every lane's copies
    fill = slot;  // next step refills the slot read now (cur) and reads the one after it
    if (slot + su4 == ring_end) slot = ring;
    else slot += su4;
    step_mma<T, BITS, NT, SX, R, GS, KCHK>(a, fill, s, s + 1 == s1, sx, ldx, xo, lane, acc, tmp, xsum);
  }

  // block reduction over the warps' K slices, in the rings' memory once every warp is done
  cp_wait_pending(0);
  __syncthreads();
  float(*red)[R * NT * 4][32] = reinterpret_cast<float(*)[R * NT * 4][32]>(dyn_smem + a.ring_off);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int r = 0; r < R; ++r) red[warp][(r * NT + n) * 4 + e][lane] = acc[r][n][e];
    }
  }
  __syncthreads();
  for (int r = warp; r < R; r += nwarps) {  // warp r finishes tile r
    const int tile = tile0 + r;
    if (tile >= a.ntiles) break;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      float y[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = 0.f;
        for (int w2 = 0; w2 < nwarps; ++w2) v += red[w2][(r * NT + n) * 4 + e][lane];
        y[e] = v;
      }
      if (NORM) scale_rms(a, y, rss_sx, nwarps, n, lane);
      store_tile<T>(a, y, tile, n, lane);
      // up to 8 rows only: compiled into the 2- and 4-fragment kernels it made ptxas spill (R = 1)
      if constexpr (NT == 1) {
        if (a.epi == ACCUM && io.xn_out != nullptr) next_norm_input<T>(a, io, tile, n, lane);
      }
    }
  }
}

// out[N, K] (T = half / bf16 / float) = W, exact in fp32 before the cast: w = s * q + (-s z).
// grid (#tiles, cdiv(S, 4)), block 128: warp w decodes step 4*blockIdx.y + w of its tile.
template <typename T, int BITS>
__global__ void __launch_bounds__(128) dequant_kernel(const uint4* __restrict__ tiles, const float4* __restrict__ coef,
                                                      T* __restrict__ out, int N, int K, int S, int Lp, int log2_spg) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, s = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (s >= S) return;
  const uint4* tp = tiles + ((size_t)tile * S + s) * BITS * 32 + lane;
  uint32_t w[4 * BITS];
#pragma unroll
  for (int j = 0; j < BITS; ++j) {
    const uint4 v = ld_stream(tp + j * 32);
    w[4 * j] = v.x; w[4 * j + 1] = v.y; w[4 * j + 2] = v.z; w[4 * j + 3] = v.w;
  }
#pragma unroll
  for (int sp = 0; sp < 8; ++sp) {
    const int span = s * 8 + sp, k = span * 32 + 8 * t;
    if (k >= K) break;
    const float4 cf = __ldg(coef + ((size_t)tile * Lp + (span >> log2_spg)) * 8 + g);
    float v[2][8];  // [row g / g+8][8 consecutive columns]
#pragma unroll
    for (int f = 0; f < 2; ++f) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 q = Num<__half>::f2(pair<BITS>(w, 8 * sp + 4 * f + i, Num<__half>::magic));
        const int r = i & 1, c = 4 * f + 2 * (i >> 1);
        const float sc = r ? cf.z : cf.x, zc = r ? cf.w : cf.y;
        v[r][c] = fmaf(q.x - 1024.f, sc, zc);
        v[r][c + 1] = fmaf(q.y - 1024.f, sc, zc);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = tile * 16 + g + 8 * r;
      if (row >= N) continue;
      T* o = out + (size_t)row * K + k;
      if constexpr (sizeof(T) == 4) {
        reinterpret_cast<float4*>(o)[0] = make_float4(v[r][0], v[r][1], v[r][2], v[r][3]);
        reinterpret_cast<float4*>(o)[1] = make_float4(v[r][4], v[r][5], v[r][6], v[r][7]);
      } else {
        uint4 u;
        u.x = Num<T>::pack(v[r][0], v[r][1]);
        u.y = Num<T>::pack(v[r][2], v[r][3]);
        u.z = Num<T>::pack(v[r][4], v[r][5]);
        u.w = Num<T>::pack(v[r][6], v[r][7]);
        *reinterpret_cast<uint4*>(o) = u;
      }
    }
  }
}

}  // namespace qlb

#ifdef QLB_TU_BITS
// One translation unit per bit width (cuda_ext.py builds them in parallel): host launchers. The wgmma
// GEMM's units (QLB_TU_GEMM: one per bit width and activation type) take only smem_optin from here.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <unordered_map>

#define QLB_CAT2(a, b) a##b
#define QLB_CAT(a, b) QLB_CAT2(a, b)

// Errors leave the launchers as text, never as C++ exceptions, and are formatted with vsnprintf, never
// with std::ostream. On the H200 machine (torch 2.11, nvcc 13.0, benchmarks/RESULTS.md round 13) a
// TORCH_CHECK whose message held a number killed the process with SIGSEGV instead of raising, in this
// extension and in a one-line load_inline one alike: the crash is in std::ostream::_M_insert<long> as
// instantiated inside the extension's .so, which c10::str calls to format the number. Every entry point
// takes the binding's buffer `err` of QLB_ERR_BYTES (cuda_ext.ERR_BYTES): left empty on success, else
// the message the binding raises as it is. Checks of the arguments' types are the binding's, so nothing
// here calls a throwing accessor (data_ptr<T>()).
#ifndef QLB_ERR_BYTES
#define QLB_ERR_BYTES 1024
#endif

// Internal linkage: every translation unit defines launch_gemv<T> for its own BITS, and with
// external linkage the linker would keep one of them for all three bit widths.
namespace {

__attribute__((format(printf, 2, 3))) bool fail(char* err, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(err, QLB_ERR_BYTES, fmt, args);
  va_end(args);
  return false;
}
// QLB_CHECK(err, cond, printf format, values...): fail unless cond
#define QLB_CHECK(err, cond, ...)               \
  do {                                          \
    if (!(cond)) return fail(err, __VA_ARGS__); \
  } while (0)
// QLB_CUDA(err, a CUDA runtime call): fail with the call and CUDA's message unless it succeeded
#define QLB_CUDA(err, expr)                                                             \
  do {                                                                                  \
    const cudaError_t e_ = (expr);                                                      \
    if (e_ != cudaSuccess) return fail(err, "%s: %s", #expr, cudaGetErrorString(e_));   \
  } while (0)

// The launch's own error (a bad configuration), once the kernels are queued.
bool launch_error(char* err) {
  QLB_CUDA(err, cudaGetLastError());
  return true;
}

// Staging costs every block a pass over M x K activations (fp32 with NORM) and shared memory that
// caps the blocks per SM: at M = 1 it paid, at M = 8 it lost (qkv 4 bit, H100: 42 us against 34
// unstaged; benchmarks/RESULTS.md).
constexpr int SX_MAX_ROWS = 4;
constexpr int SX_MAX_BYTES = 24 * 1024;

// dyn: the most dynamic shared memory a block of ``kern`` may take, the device's opt-in limit less
// the kernel's static shared memory. The kernel's limit (48 KB by default) is raised to it once per
// device.
bool smem_optin(const void* kern, int& dyn, char* err) {
  static thread_local std::unordered_map<const void*, uint64_t> done;  // kernel -> device bitmask
  int dev = 0, optin = 0;
  QLB_CUDA(err, cudaGetDevice(&dev));
  QLB_CUDA(err, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr;
  QLB_CUDA(err, cudaFuncGetAttributes(&attr, kern));
  dyn = optin - static_cast<int>(attr.sharedSizeBytes);
  uint64_t& mask = done[kern];
  if (!(mask & (1ull << dev))) {
    QLB_CUDA(err, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
    mask |= 1ull << dev;
  }
  return true;
}

}  // namespace

#ifndef QLB_TU_GEMM
namespace {

// Tiles per block (the kernel's R) by row count: the activation fragments (and group sums) a warp
// loads serve R tiles. R = 2 measured best on an H200 at M >= 8 (benchmarks/RESULTS.md, round 3:
// against R = 1, qkv 4 bit M = 16 22.9 against 34.3 us; R = 4 lost at M >= 8 on three of four
// shapes). For staged rows (SX) round 6's shorter step loop turned it at 4 bit: with R = 1 twice the
// warps stream the weight, every shape ran 4-11% faster at M = 1 (qkv 10.7 against 11.7 us), 32
// layers' GEMVs 53.5 against 58.6 us a layer, decode 493.8 against 457.6 tok/s; at 2 bit R = 2 stays
// ahead on qkv and gate_up (7.8 against 9.0 us). A weight of fewer than R * QLB_MIN_BLOCKS tiles keeps
// R = 1, too few blocks to fill the SMs. Defines, so that benchmarks/kernel_ab.py can A/B them.
#ifndef QLB_R_SX
#define QLB_R_SX (QLB_TU_BITS == 4 ? 1 : 2)
#endif
#ifndef QLB_R_M8
#define QLB_R_M8 2
#endif
#ifndef QLB_R_M16
#define QLB_R_M16 2
#endif
#ifndef QLB_R_M32
#define QLB_R_M32 2
#endif
#ifndef QLB_MIN_BLOCKS
#define QLB_MIN_BLOCKS 128
#endif

// kern<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when pdl is set
// (gemv_kernel's pdl_trigger / pdl_wait).
template <typename... Params, typename... Args>
bool launch(char* err, void (*kern)(Params...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
            Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  QLB_CUDA(err, cudaLaunchKernelEx(&cfg, kern, static_cast<Params>(args)...));
  return true;
}

// ss_in, nw_next, xn_out, ss_out: NormIO's (empty: none)
template <typename T>
bool launch_gemv(const torch::Tensor& x, const torch::Tensor& nw, const torch::Tensor& tiles, const torch::Tensor& coef,
                 const torch::Tensor& bias, torch::Tensor& out, const torch::Tensor& ss_in,
                 const torch::Tensor& nw_next, torch::Tensor& xn_out, torch::Tensor& ss_out, int M, int N, int K,
                 int log2_spg, int epi, double eps, int warps, int stages, bool pdl, char* err) {
  constexpr int BITS = QLB_TU_BITS;
  const int T_ = tiles.size(0), S = tiles.size(1), Lp = coef.size(1);
  const bool pre = ss_in.numel() > 0, next = xn_out.numel() > 0;
  const bool norm = nw.numel() > 0 || pre;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int ng = log2_spg >= 3 ? 1 : 8 >> log2_spg;  // groups per step
  const int x_bytes = (M * qlb::sx_ld(K) * (int)sizeof(T) + 15) / 16 * 16;
  const bool sx = M <= SX_MAX_ROWS && K % 8 == 0 && x_bytes <= SX_MAX_BYTES;
  const int nt = sx || M <= 8 ? 1 : (M <= 16 ? 2 : 4);
  const int r_want = sx ? QLB_R_SX : (M <= 8 ? QLB_R_M8 : (M <= 16 ? QLB_R_M16 : QLB_R_M32));
  const int r = T_ >= r_want * QLB_MIN_BLOCKS ? r_want : 1;
  QLB_CHECK(err, !norm || sx, "the fused RMSNorm needs x staged in shared memory (M <= %d)", SX_MAX_ROWS);
  QLB_CHECK(err, !pre || (ss_in.dim() == 2 && ss_in.size(0) == M), "the partial sums of squares must be [M = %d, P]",
            M);
  QLB_CHECK(err, !pre || BITS == 4, "x already normalized (partial sums of squares) takes 4-bit weights, not %d-bit",
            BITS);
  QLB_CHECK(err, !next || (epi == qlb::ACCUM && nw_next.numel() == N && xn_out.numel() == (int64_t)M * N &&
                           ss_out.numel() == (int64_t)M * T_),
            "the next norm's input needs the residual epilogue, a weight [%d], xn [%d, %d] and sums [%d, %d]", N, M, N,
            M, T_);
  QLB_CHECK(err, !next || M <= 8, "the next norm's input is written for up to 8 rows, not %d", M);
  // the unstaged kernels address x in 32-bit offsets (xo in gemv_kernel)
  QLB_CHECK(err, sx || (long long)(M - 1) * x.stride(0) + K <= 0x7fffffffLL,
            "x's %d rows span more than 2^31 elements (row stride %lld): pass x contiguous", M, (long long)x.stride(0));
  const int groups = (T_ + r - 1) / r;
  qlb::GemvArgs a;
  a.xv = x.data_ptr();
  a.nw = norm ? static_cast<const float*>(nw.data_ptr()) : nullptr;
  a.tiles = reinterpret_cast<const uint4*>(tiles.data_ptr());
  a.coef = reinterpret_cast<const float4*>(coef.data_ptr());
  a.bias = bias.numel() > 0 ? static_cast<const float*>(bias.data_ptr()) : nullptr;
  a.outv = out.data_ptr();
  a.M = M; a.N = N; a.K = K; a.S = S; a.Lp = Lp; a.log2_spg = log2_spg;
  a.stride_xm = x.stride(0); a.stride_om = out.stride(0);
  a.epi = epi; a.eps = (float)eps; a.ntiles = T_;
  a.ring_off = sx ? x_bytes / 16 : 0;
  qlb::NormIO io;
  io.ss_in = pre ? static_cast<const float*>(ss_in.data_ptr()) : nullptr;
  io.nss = pre ? ss_in.size(1) : 0;
  io.nw_next = next ? static_cast<const float*>(nw_next.data_ptr()) : nullptr;
  io.xn_out = next ? xn_out.data_ptr() : nullptr;
  io.ss_out = next ? static_cast<float*>(ss_out.data_ptr()) : nullptr;
  a.nst = std::max(1, std::min(stages, (S + warps - 1) / warps));
  // dynamic shared memory: the staged activations (SX: M rows of sx_ld(K) elements, up to
  // SX_MAX_BYTES), then each warp's ring of nst slots; the rings' memory then holds the block
  // reduction, fp32 [warps][R * NT * 4][32] (more than a shallow ring of small slots can hold)
  const int slot_bytes = r * (BITS * 32 + ng * 8) * 16;
  const int smem = (sx ? x_bytes : 0) + warps * std::max(a.nst * slot_bytes, r * nt * 4 * 32 * 4);
  const dim3 block(32 * warps);
  auto go = [&](auto kern) {
    int dyn_max = 0;
    if (!smem_optin(reinterpret_cast<const void*>(kern), dyn_max, err)) return false;
    QLB_CHECK(err, smem <= dyn_max,
              "gemv needs %d bytes of shared memory, the device allows %d; use fewer warps or stages", smem, dyn_max);
    return launch(err, kern, dim3(groups), block, smem, stream, pdl, a, io);
  };
  bool ok = false;
  // unstaged x whose K is not whole 256-column steps: the kernels that test each load against K (the group size
  // read at run time); the others read x unchecked
  const bool ktail = !sx && K % 256 != 0;
#define QLB_GEMV(NT, NORM, SX, R, GS) ok = go(qlb::gemv_kernel<T, BITS, NT, NORM, SX, R, GS, false>)
  // Up to 16 rows, groups of 128 (4 spans: the common case) compile the group epilogue for that size,
  // with no test and branch per span (SASS, step loop at M = 1: 467 instructions against ~710 run;
  // H200: 15-25% less time at M = 1..16, benchmarks/RESULTS.md round 6). At 32 rows it measured
  // slower (qkv 44.1 against 41.5 us), so there and at other group sizes the size is read at run time.
#define QLB_GEMV_G(NT, NORM, SX, R)                                                                                 \
  do {                                                                                                              \
    if constexpr (!SX) {                                                                                            \
      if (ktail) {                                                                                                  \
        ok = go(qlb::gemv_kernel<T, BITS, NT, NORM, SX, R, -1, true>);                                              \
        break;                                                                                                      \
      }                                                                                                             \
    }                                                                                                               \
    if constexpr (NT < 4) {                                                                                         \
      if (log2_spg == 2) {                                                                                          \
        QLB_GEMV(NT, NORM, SX, R, 2);                                                                               \
        break;                                                                                                      \
      }                                                                                                             \
    }                                                                                                               \
    QLB_GEMV(NT, NORM, SX, R, -1);                                                                                  \
  } while (0)
  // each row-count class instantiates R = 1 and its own R (the same kernel when that is 1); the norm
  // is fused only where x is staged
#define QLB_GEMV_R(NT, SX, RW)                                                                                      \
  do {                                                                                                              \
    if constexpr (SX) {                                                                                             \
      if (norm) {                                                                                                   \
        if (r == 1) QLB_GEMV_G(NT, true, SX, 1);                                                                    \
        else QLB_GEMV_G(NT, true, SX, RW);                                                                          \
        break;                                                                                                      \
      }                                                                                                             \
    }                                                                                                               \
    if (r == 1) QLB_GEMV_G(NT, false, SX, 1);                                                                       \
    else QLB_GEMV_G(NT, false, SX, RW);                                                                             \
  } while (0)
  if (sx) QLB_GEMV_R(1, true, QLB_R_SX);
  else if (M <= 8) QLB_GEMV_R(1, false, QLB_R_M8);
  else if (M <= 16) QLB_GEMV_R(2, false, QLB_R_M16);
  else QLB_GEMV_R(4, false, QLB_R_M32);
#undef QLB_GEMV_R
#undef QLB_GEMV_G
#undef QLB_GEMV
  return ok;
}

template <typename T>
void launch_dequant(const torch::Tensor& tiles, const torch::Tensor& coef, T* out, int N, int K, int log2_spg) {
  const int T_ = tiles.size(0), S = tiles.size(1), Lp = coef.size(1);
  dim3 grid(T_, (S + 3) / 4), block(128);
  qlb::dequant_kernel<T, QLB_TU_BITS><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(tiles.data_ptr()), reinterpret_cast<const float4*>(coef.data_ptr()), out, N, K, S,
      Lp, log2_spg);
}

}  // namespace

void QLB_CAT(gemv_b, QLB_TU_BITS)(torch::Tensor x, torch::Tensor nw, torch::Tensor tiles, torch::Tensor coef,
                                  torch::Tensor bias, torch::Tensor out, torch::Tensor ss_in, torch::Tensor nw_next,
                                  torch::Tensor xn_out, torch::Tensor ss_out, int64_t n, int64_t k, int64_t log2_spg,
                                  int64_t epi, double eps, int64_t warps, int64_t stages, bool bf16, bool pdl,
                                  char* err) {
  const int M = x.size(0);
  const bool ok = bf16 ? launch_gemv<__nv_bfloat16>(x, nw, tiles, coef, bias, out, ss_in, nw_next, xn_out, ss_out, M,
                                                    n, k, log2_spg, epi, eps, warps, stages, pdl, err)
                       : launch_gemv<__half>(x, nw, tiles, coef, bias, out, ss_in, nw_next, xn_out, ss_out, M, n, k,
                                             log2_spg, epi, eps, warps, stages, pdl, err);
  if (ok) launch_error(err);
}

void QLB_CAT(dequant_b, QLB_TU_BITS)(torch::Tensor tiles, torch::Tensor coef, torch::Tensor out, int64_t log2_spg,
                                     char* err) {
  const int N = out.size(0), K = out.size(1);
  if (out.scalar_type() == at::kBFloat16)
    launch_dequant(tiles, coef, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), N, K, log2_spg);
  else if (out.scalar_type() == at::kHalf)
    launch_dequant(tiles, coef, reinterpret_cast<__half*>(out.data_ptr()), N, K, log2_spg);
  else launch_dequant(tiles, coef, static_cast<float*>(out.data_ptr()), N, K, log2_spg);  // fp32: the binding's check
  launch_error(err);
}
#endif  // QLB_TU_GEMM
#endif  // QLB_TU_BITS
