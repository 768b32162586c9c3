// flash_wgmma_sm90a.cu: the attention forward of flash_mma.cu on Hopper's warpgroup tensor
// cores (wgmma.mma_async, sm_90a only: build.rs and compile-ptx.sh give files named *_sm90a.cu
// `-arch=sm_90a`). Same function, inputs, outputs and host spans as flash_mma.cu's forward
// (read its header for the layouts and the mask); opt-in as `OMR_MMA=wg` for head dim 128.
//
// One CTA per (128 query rows, b·H + h): two warpgroups of 64 rows, 128-key tiles. Q, K and V
// sit in shared memory in the 128-byte-swizzled K-major layout (below); K and V are double
// buffered with cp.async, so tile j + 1 loads while tile j computes. Per tile and warpgroup:
//   S = Q·K^T   wgmma m64n128k16, A = Q and B = K from shared memory (both K-major), 8 k-steps;
//   softmax     online, exp2 domain, per row as in flash_mma.cu (the accumulator fragment of a
//               warp is mma.sync's C fragment for its 16 rows);
//   O += P·V    wgmma m64n128k16, A = P from registers (bf16, the C → A repacking of
//               flash_mma.cu), B = V from shared memory read N-major (imm-trans-b = 1), 8
//               k-steps of 16 keys.
// The 64 × 128 f32 accumulators of S and O live in registers (64 + 64 per thread).
//
// Shared-memory layout (SW128): a tile of R rows × 128 bf16 is two column blocks of R × 64
// (128-byte rows), block c at c·R·64 elements; the 16-byte chunk k of row r sits at chunk
// k ^ (r % 8) of its row. The hardware applies that XOR to address bits [4, 7) from bits
// [7, 10), so every block starts at a multiple of 1024 bytes. Descriptors (PTX ISA
// "Matrix Descriptor Format"): start address, LBO, SBO (each >> 4), swizzle mode 1 (128 B):
//   K-major (Q as A, K as B): SBO = 1024 (8 rows of 128 B), LBO unused (1); k-step kk starts
//     at block kk / 4, byte 32·(kk % 4) of the row;
//   N-major (V as B, K = keys, N = head dim): SBO = 1024 (8 keys), LBO = R·128 bytes (the next
//     64 columns: the other block); k-step kk starts at key 16·kk (2048 bytes on).
// `wgmma_probe` runs these helpers alone on one warpgroup (a GEMM each way) so that a layout
// fault shows in `omr bench kernels` apart from the attention.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_wgmma_sm90a.cu needs -arch=sm_90a"
#endif

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// What cp.async (the generic proxy) wrote becomes visible to wgmma (the async proxy); each
// writing thread runs it before the barrier that publishes the tile.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// Pins registers the asynchronous products read or write to this point of the program, so
// that the compiler neither reads an accumulator before wg_wait0 nor reuses an operand
// register while a product may still read it.
template <int N>
__device__ __forceinline__ void pin(float* r) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}

__device__ __forceinline__ uint32_t pack_f(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ bool allowed(int i, int j, unsigned qs, unsigned ks, int off,
                                        int causal, int window) {
  return qs != 0u && qs == ks && (!causal || j <= i + off) && (window == 0 || j + window > i + off);
}

// A shared-memory descriptor, 128-byte swizzle; `lbo` and SBO = 1024 in bytes.
__device__ __forceinline__ uint64_t sw128_desc(const bf16* p, unsigned lbo) {
  const unsigned a = smem_addr(p);
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// `rows` rows of 128 bf16 from global row `r0` (row r at src + r·stride) into the SW128 layout
// at dst, by `nthreads` threads from `tid`; rows at or past `n` are zeros.
__device__ __forceinline__ void load_sw128(bf16* dst, const bf16* src, long stride, int r0, int n,
                                           int rows, int tid, int nthreads) {
  for (int idx = tid; idx < rows * 16; idx += nthreads) {
    const int row = idx / 16, c = idx % 16, r = r0 + row;
    const bool ok = r < n;
    cp16(dst + (c / 8) * rows * 64 + row * 64 + ((c % 8) ^ (row % 8)) * 8,
         src + (ok ? r : 0) * stride + c * 8, ok);
  }
}

#define ACC64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define D8(i)                                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define D64 D8(0), D8(8), D8(16), D8(24), D8(32), D8(40), D8(48), D8(56)

// d (64 × 128 f32, accumulated) += A·B: A 64 × 16 and B 16 × 128, both K-major in shared memory.
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC64
               ", %64, %65, 1, 1, 1, 0, 0;\n"
               : D64
               : "l"(a), "l"(b));
}

// d (64 × 128 f32, accumulated) += A·B: A 64 × 16 from registers (mma.sync's A fragment for
// each warp's 16 rows), B 16 × 128 N-major in shared memory.
__device__ __forceinline__ void wgmma_rs_tn(float* d, const uint32_t* a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC64
               ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
               : D64
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// The A fragment of k-step kk from accumulator fragments (n-tiles 2kk, 2kk + 1).
__device__ __forceinline__ void acc_to_a(const float* c, int kk, uint32_t* a) {
  a[0] = pack_f(c[8 * kk + 0], c[8 * kk + 1]);
  a[1] = pack_f(c[8 * kk + 2], c[8 * kk + 3]);
  a[2] = pack_f(c[8 * kk + 4], c[8 * kk + 5]);
  a[3] = pack_f(c[8 * kk + 6], c[8 * kk + 7]);
}

constexpr int WG_BR = 128, WG_BC = 128, WG_D = 128;

// Dynamic shared memory of the forward (flash_mma/tiling.rs's wg_smem): Q, K and V twice,
// key segment ids twice, and 1024 bytes to align the base.
#define WG_SMEM (1024 + 2 * (WG_BR * WG_D + 4 * WG_BC * WG_D) + 4 * 2 * WG_BC)

__device__ __forceinline__ bf16* aligned_smem(unsigned char* raw) {
  return reinterpret_cast<bf16*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
}

extern "C" __global__ void __launch_bounds__(256, 1)
    flash_wg_fwd_d128(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const unsigned* __restrict__ qseg,
                      const unsigned* __restrict__ kseg, const int* __restrict__ span,
                      bf16* __restrict__ o, float* __restrict__ lse, int T, int S, int H, int KV,
                      float scale_log2, int causal, int window) {
  constexpr int BR = WG_BR, BC = WG_BC, D = WG_D;
  extern __shared__ __align__(1024) unsigned char wg_raw[];
  bf16* qs = aligned_smem(wg_raw);  // BR × D
  bf16* ks = qs + BR * D;           // [2][BC × D]
  bf16* vs = ks + 2 * BC * D;       // [2][BC × D]
  unsigned* kss = reinterpret_cast<unsigned*>(vs + 2 * BC * D);  // [2][BC]
  const int tid = threadIdx.x, wg = tid / 128, wl = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int qb = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
  const int kvh = h / (H / KV);
  const int off = S - T;
  const int g0 = qb * BR + wg * 64;  // the warpgroup's first row
  const int w0 = g0 + wl * 16;       // the warp's first row
  const int nblk = (T + BR - 1) / BR;
  const int lo = span[2 * (b * nblk + qb)], hi = span[2 * (b * nblk + qb) + 1];
  const bf16* kb = k + ((long)b * S * KV + kvh) * D;
  const bf16* vb = v + ((long)b * S * KV + kvh) * D;
  const long kstride = (long)KV * D;

  // The block's rows in one segment (qblk ≠ 0) or not (qblk = 0: every tile is masked).
  const unsigned q_first = qseg[(long)b * T + qb * BR];
  const int q_uni = __syncthreads_and(tid >= BR || qb * BR + tid >= T ||
                                      qseg[(long)b * T + qb * BR + tid] == q_first);
  const unsigned qblk = q_uni ? q_first : 0u;
  const int w_last = min(w0 + 15, T - 1);

  if (lo < hi) {
    load_sw128(qs, q + ((long)b * T * H + h) * D, (long)H * D, qb * BR, T, BR, tid, 256);
    load_sw128(ks, kb, kstride, lo, S, BC, tid, 256);
    load_sw128(vs, vb, kstride, lo, S, BC, tid, 256);
    cp_commit();
  }
  const int r0 = w0 + g, r1 = r0 + 8;
  const unsigned qs0 = r0 < T ? qseg[(long)b * T + r0] : 0u;
  const unsigned qs1 = r1 < T ? qseg[(long)b * T + r1] : 0u;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; i++) acc[i] = 0.f;
  const bf16* qwg = qs + wg * 64 * 64;  // the warpgroup's 64 rows of each column block

  for (int j0 = lo, it = 0; j0 < hi; j0 += BC, it++) {
    const int cur = it & 1;
    const bool more = j0 + BC < hi;
    if (more) {
      load_sw128(ks + (cur ^ 1) * BC * D, kb, kstride, j0 + BC, S, BC, tid, 256);
      load_sw128(vs + (cur ^ 1) * BC * D, vb, kstride, j0 + BC, S, BC, tid, 256);
      cp_commit();
    }
    // This tile's key segments, and whether they are all the block's one segment.
    bool seg_whole = true;
    if (tid < BC) {
      const int j = j0 + tid;
      const unsigned s = j < S ? kseg[(long)b * S + j] : 0u;
      kss[cur * BC + tid] = s;
      seg_whole = j < S && s == qblk && qblk != 0u;
    }
    if (more)
      cp_wait<1>();
    else
      cp_wait<0>();
    fence_proxy_async();
    // Tile `cur` (and Q) have landed for every thread.
    const bool tile_whole = __syncthreads_and(seg_whole);
    // The causal mask removes the tile for the whole warpgroup: skip its products.
    const bool skip = causal && j0 > g0 + 63 + off;
    const bool whole = tile_whole && (!causal || j0 + BC - 1 <= w0 + off) &&
                       (window == 0 || j0 + window > w_last + off);
    const bf16* kt = ks + cur * BC * D;
    const bf16* vt = vs + cur * BC * D;
    if (!skip) {
      float s[BC / 2];
#pragma unroll
      for (int i = 0; i < BC / 2; i++) s[i] = 0.f;
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++)
        wgmma_ss(s, sw128_desc(qwg + (kk / 4) * BR * 64 + (kk % 4) * 16, 16),
                 sw128_desc(kt + (kk / 4) * BC * 64 + (kk % 4) * 16, 16));
      wg_commit();
      wg_wait0();
      pin<BC / 2>(s);
      float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
      for (int n = 0; n < BC / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const bool top = e < 2;
          float x = s[4 * n + e] * scale_log2;
          if (!whole) {
            const int jl = n * 8 + 2 * t + (e & 1), j = j0 + jl;
            const int i = top ? r0 : r1;
            const bool ok = j < S && i < T &&
                            allowed(i, j, top ? qs0 : qs1, kss[cur * BC + jl], off, causal, window);
            x = ok ? x : NEG_INF;
          }
          s[4 * n + e] = x;
          if (top)
            mx0 = fmaxf(mx0, x);
          else
            mx1 = fmaxf(mx1, x);
        }
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      // As in flash_mma.cu: rescale 1 while nothing was summed, subtract 0 for a row with no
      // allowed key yet (its scores are all −∞ → 0).
      const float a0 = mn0 == NEG_INF ? 1.f : exp2f(m0 - mn0);
      const float a1 = mn1 == NEG_INF ? 1.f : exp2f(m1 - mn1);
      const float z0 = mn0 == NEG_INF ? 0.f : mn0, z1 = mn1 == NEG_INF ? 0.f : mn1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int n = 0; n < BC / 8; n++) {
        s[4 * n + 0] = exp2f(s[4 * n + 0] - z0);
        s[4 * n + 1] = exp2f(s[4 * n + 1] - z0);
        s[4 * n + 2] = exp2f(s[4 * n + 2] - z1);
        s[4 * n + 3] = exp2f(s[4 * n + 3] - z1);
        sum0 += s[4 * n + 0] + s[4 * n + 1];
        sum1 += s[4 * n + 2] + s[4 * n + 3];
      }
      uint32_t pa[BC / 16][4];
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) acc_to_a(s, kk, pa[kk]);
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      m0 = mn0;
      m1 = mn1;
#pragma unroll
      for (int n = 0; n < D / 8; n++) {
        acc[4 * n + 0] *= a0;
        acc[4 * n + 1] *= a0;
        acc[4 * n + 2] *= a1;
        acc[4 * n + 3] *= a1;
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++)
        wgmma_rs_tn(acc, pa[kk], sw128_desc(vt + kk * 16 * 64, BC * 128));
      wg_commit();
      wg_wait0();
      pin<D / 2>(acc);
      pin<BC / 4>(&pa[0][0]);
    }
    // Every warpgroup is done with tile `cur` before the next iteration loads into it.
    __syncthreads();
  }
  const float ln2 = 0.69314718055994531f;
  float L0 = l0, L1 = l1;
  L0 += __shfl_xor_sync(0xffffffffu, L0, 1);
  L0 += __shfl_xor_sync(0xffffffffu, L0, 2);
  L1 += __shfl_xor_sync(0xffffffffu, L1, 1);
  L1 += __shfl_xor_sync(0xffffffffu, L1, 2);
  const float inv0 = L0 > 0.f ? 1.f / L0 : 0.f, inv1 = L1 > 0.f ? 1.f / L1 : 0.f;
  if (r0 < T) {
    uint32_t* o0 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r0) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++) o0[n * 4] = pack_f(acc[4 * n] * inv0, acc[4 * n + 1] * inv0);
    if (t == 0) lse[((long)b * H + h) * T + r0] = L0 > 0.f ? (m0 + log2f(L0)) * ln2 : NEG_INF;
  }
  if (r1 < T) {
    uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      o1[n * 4] = pack_f(acc[4 * n + 2] * inv1, acc[4 * n + 3] * inv1);
    if (t == 0) lse[((long)b * H + h) * T + r1] = L1 > 0.f ? (m1 + log2f(L1)) * ln2 : NEG_INF;
  }
}

// The layout probe, one warpgroup (128 threads), WG_PROBE_SMEM bytes of dynamic shared memory:
// a (64 × 128) and bk (128 × 128) bf16, row major; s = a·bk^T through wgmma_ss (both K-major)
// and o = a·bk through wgmma_rs_tn (a from registers, bk read N-major), both 64 × 128 f32,
// row major, written from the accumulator fragments.
#define WG_PROBE_SMEM (1024 + 2 * (64 * 128 + 128 * 128))

extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe(const bf16* __restrict__ a, const bf16* __restrict__ bk, float* __restrict__ s_out,
                float* __restrict__ o_out) {
  extern __shared__ __align__(1024) unsigned char wg_raw[];
  bf16* as = aligned_smem(wg_raw);  // 64 × 128
  bf16* bs = as + 64 * 128;         // 128 × 128
  const int tid = threadIdx.x, wl = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  load_sw128(as, a, 128, 0, 64, 64, tid, 128);
  load_sw128(bs, bk, 128, 0, 128, 128, tid, 128);
  cp_commit();
  cp_wait<0>();
  fence_proxy_async();
  __syncthreads();
  float s[64], acc[64];
#pragma unroll
  for (int i = 0; i < 64; i++) s[i] = acc[i] = 0.f;
  // A fragments of a (rows 16·wl + g and + 8), one per k-step of 16 columns.
  uint32_t pa[8][4];
  const bf16* ra = a + (16 * wl + g) * 128;
  const bf16* rb = ra + 8 * 128;
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    pa[kk][0] = ld32(ra + kk * 16 + 2 * t);
    pa[kk][1] = ld32(rb + kk * 16 + 2 * t);
    pa[kk][2] = ld32(ra + kk * 16 + 8 + 2 * t);
    pa[kk][3] = ld32(rb + kk * 16 + 8 + 2 * t);
  }
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++)
    wgmma_ss(s, sw128_desc(as + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16),
             sw128_desc(bs + (kk / 4) * 128 * 64 + (kk % 4) * 16, 16));
#pragma unroll
  for (int kk = 0; kk < 8; kk++) wgmma_rs_tn(acc, pa[kk], sw128_desc(bs + kk * 16 * 64, 128 * 128));
  wg_commit();
  wg_wait0();
  pin<64>(s);
  pin<64>(acc);
  pin<32>(&pa[0][0]);
  const int r = 16 * wl + g;
#pragma unroll
  for (int n = 0; n < 16; n++) {
    const int c = 8 * n + 2 * t;
    *reinterpret_cast<float2*>(s_out + r * 128 + c) = make_float2(s[4 * n], s[4 * n + 1]);
    *reinterpret_cast<float2*>(s_out + (r + 8) * 128 + c) = make_float2(s[4 * n + 2], s[4 * n + 3]);
    *reinterpret_cast<float2*>(o_out + r * 128 + c) = make_float2(acc[4 * n], acc[4 * n + 1]);
    *reinterpret_cast<float2*>(o_out + (r + 8) * 128 + c) =
        make_float2(acc[4 * n + 2], acc[4 * n + 3]);
  }
}
