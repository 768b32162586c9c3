// flash_wgmma_sm90a.cu: the attention of flash_mma.cu on Hopper's warpgroup tensor cores
// (wgmma.mma_async, sm_90a only: build.rs and compile-ptx.sh give files named *_sm90a.cu
// `-arch=sm_90a`). Same function, inputs, outputs and host spans as flash_mma.cu's forward and
// backward (read its header for the layouts and the mask); opt-in as `OMR_MMA=wg` (`wgf`
// forward, `wgb` backward) for head dim 128. The forward is described here, the backward above
// flash_wg_bwd_d128.
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
// `wgmma_probe` runs each operand layout alone on one warpgroup (a GEMM each) so that a layout
// fault shows in `omr bench kernels` apart from the attention; scripts/cuda/emu runs this file
// on the CPU (OMR_EMU) against attention in double precision.
#ifndef OMR_EMU
#include "common.cuh"
#endif

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_wgmma_sm90a.cu needs -arch=sm_90a"
#endif

#define NEG_INF (-__int_as_float(0x7f800000))

// The inline-PTX helpers: smem addresses, cp.async, proxy fence, wgmma and its fences. With
// OMR_EMU defined (the header to include instead), scripts/cuda/emu runs these kernels on the
// CPU with its own versions of them, each the PTX ISA's documented semantics.
#ifdef OMR_EMU
#include OMR_EMU
#else
#define DYN_SMEM(ALIGN, NAME) extern __shared__ __align__(ALIGN) unsigned char NAME[]
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0)
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

// Pins registers the asynchronous products read or write to this point of the program: before
// wg_fence, so that their last writes (zeroing, rescaling, packing) come before the fence;
// after wg_wait0, so that the compiler neither reads an accumulator early nor reuses an
// operand register while a product may still read it.
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

#define ACC32                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define D32 D8(0), D8(8), D8(16), D8(24)

// d (64 × 64 f32, accumulated) += A·B, both from shared memory: K-major (TRANS 0) or A
// M-major and B N-major (TRANS 1).
template <int TRANS>
__device__ __forceinline__ void wgmma_ss64(float* d, uint64_t a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ACC32
               ", %32, %33, 1, 1, 1, %34, %34;\n"
               : D32
               : "l"(a), "l"(b), "n"(TRANS));
}

#endif  // OMR_EMU

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
  DYN_SMEM(1024, wg_raw);
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
      pin<BC / 2>(s);
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
      pin<D / 2>(acc);
      pin<BC / 4>(&pa[0][0]);
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

// The backward on wgmma, for D 128: one CTA of two warpgroups per (128 keys, b·H + h), each
// warpgroup 64 keys; K and V in shared memory for the whole CTA, steps of 64 query rows with
// Q, dO (SW128), lse, Δ and segment ids double-buffered by cp.async. Per step:
//   1. S^T = K·Q^T and dP^T = V·dO^T (64 keys × 64 queries per warpgroup), wgmma m64n64k16,
//      both operands K-major from shared memory;
//   2. P^T = exp(S^T·scale − lse) and dS^T = P^T ∘ (dP^T − Δ)·scale in registers (masked as
//      flash_mma.cu's backward), dS^T to shared memory (bf16, [key][query], SW128);
//   3. dV += P^T·dO and dK += dS^T·Q (64 keys × 128 per warpgroup, accumulated in registers
//      over the steps), wgmma m64n128k16 with P^T / dS^T from registers and dO / Q read
//      N-major;
//   4. dQ = dS·K (64 queries × 64 columns per warpgroup, the CTA's 128 keys), wgmma
//      m64n64k16 with dS read M-major and K N-major from shared memory, added to dq with
//      float2 atomics.
// dK / dV per query head as flash_mma.cu's backward (f32, (B, S, H, D)); the host sums a GQA
// group's heads. Dynamic shared memory WG_BWD_SMEM (flash_mma/tiling.rs's wg_bwd_smem).
#define WG_BWD_SMEM (1024 + 2 * (4 * 128 * 128 + 128 * 64) + 4 * 3 * 2 * 64)

extern "C" __global__ void __launch_bounds__(256, 1)
    flash_wg_bwd_d128(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const bf16* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,
                      const int* __restrict__ span, float* __restrict__ dq,
                      float* __restrict__ dk, float* __restrict__ dv, int T, int S, int H, int KV,
                      float scale, int causal, int window) {
  constexpr int BR = 64, BC = 128, D = 128;
  DYN_SMEM(1024, wg_raw);
  bf16* ks = aligned_smem(wg_raw);  // BC × D
  bf16* vs = ks + BC * D;           // BC × D
  bf16* qs = vs + BC * D;           // [2][BR × D]
  bf16* dos = qs + 2 * BR * D;      // [2][BR × D]
  bf16* dst = dos + 2 * BR * D;     // BC × BR: dS^T, [key][query]
  float* lses = reinterpret_cast<float*>(dst + BC * BR);      // [2][BR]
  float* dls = lses + 2 * BR;                                 // [2][BR]
  unsigned* qss = reinterpret_cast<unsigned*>(dls + 2 * BR);  // [2][BR]
  const int tid = threadIdx.x, wg = tid / 128, wl = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int off = S - T;
  const int nblk = (S + BC - 1) / BC;
  const int lo = span[2 * (b * nblk + kb)], hi = span[2 * (b * nblk + kb) + 1];
  const int jg = kb * BC + wg * 64;  // the warpgroup's first key
  const int kw = jg + wl * 16;       // the warp's first key
  const int k0 = kw + g, k1 = k0 + 8;
  const long qstride = (long)H * D;
  const bf16* qb = q + ((long)b * T * H + h) * D;
  const bf16* db = dout + ((long)b * T * H + h) * D;
  const float* lb = lse + ((long)b * H + h) * T;
  const float* deb = delta + ((long)b * H + h) * T;
  const unsigned* qsb = qseg + (long)b * T;
  // Rows [i0, i0 + BR) of the query side into buffer `buf`; thread r copies row r's scalars.
  auto load_q = [&](int i0, int buf) {
    load_sw128(qs + buf * BR * D, qb, qstride, i0, T, BR, tid, 256);
    load_sw128(dos + buf * BR * D, db, qstride, i0, T, BR, tid, 256);
    if (tid < BR) {
      const int i = i0 + tid;
      const bool ok = i < T;
      const int ic = ok ? i : 0;
      cp4(&lses[buf * BR + tid], lb + ic, ok);
      cp4(&dls[buf * BR + tid], deb + ic, ok);
      cp4(&qss[buf * BR + tid], qsb + ic, ok);
    }
  };

  // The CTA's keys in one segment and all before S (kblk ≠ 0), or not (every step masked).
  const unsigned k_first = kseg[(long)b * S + kb * BC];
  const int k_uni = __syncthreads_and(
      tid >= BC || (kb * BC + tid < S && kseg[(long)b * S + kb * BC + tid] == k_first));
  const unsigned kblk = k_uni ? k_first : 0u;
  const unsigned ks0 = k0 < S ? kseg[(long)b * S + k0] : 0u;
  const unsigned ks1 = k1 < S ? kseg[(long)b * S + k1] : 0u;

  load_sw128(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, BC, tid, 256);
  load_sw128(vs, v + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, BC, tid, 256);
  if (lo < hi) load_q(lo, 0);
  cp_commit();
  float dka[D / 2], dva[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; i++) dka[i] = dva[i] = 0.f;
  // The warpgroup's 64 keys of each column block of K and V.
  const bf16* kwg = ks + wg * 64 * 64;
  const bf16* vwg = vs + wg * 64 * 64;

  for (int i0 = lo, it = 0; i0 < hi; i0 += BR, it++) {
    const int buf = it & 1;
    const bool more = i0 + BR < hi;
    if (more) {
      load_q(i0 + BR, buf ^ 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    fence_proxy_async();
    bool seg_whole = true;
    if (tid < BR) seg_whole = i0 + tid < T && qss[buf * BR + tid] == kblk && kblk != 0u;
    // This step's rows (and K, V) have landed for every thread.
    const bool tile_whole = __syncthreads_and(seg_whole);
    const bf16* qt = qs + buf * BR * D;
    const bf16* dot = dos + buf * BR * D;
    const float* lt = lses + buf * BR;
    const float* dlt = dls + buf * BR;
    const bool whole = tile_whole && (!causal || kw + 15 <= i0 + off) &&
                       (window == 0 || kw + window > i0 + BR - 1 + off);
    // Every product runs for both warpgroups (a warpgroup whose keys the causal mask removes
    // from the step adds zeros): a branch around wgmma serializes them.
    float p[BR / 2], dp[BR / 2];
#pragma unroll
    for (int i = 0; i < BR / 2; i++) p[i] = dp[i] = 0.f;
    pin<BR / 2>(p);
    pin<BR / 2>(dp);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      const int o_k = (kk / 4) * BC * 64 + (kk % 4) * 16, o_q = (kk / 4) * BR * 64 + (kk % 4) * 16;
      wgmma_ss64<0>(p, sw128_desc(kwg + o_k, 16), sw128_desc(qt + o_q, 16));
      wgmma_ss64<0>(dp, sw128_desc(vwg + o_k, 16), sw128_desc(dot + o_q, 16));
    }
    wg_commit();
    wg_wait0();
    pin<BR / 2>(p);
    pin<BR / 2>(dp);
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int il = n * 8 + 2 * t + (e & 1), i = i0 + il;
        const int j = e < 2 ? k0 : k1;
        const bool ok = whole || (i < T && j < S &&
                                  allowed(i, j, qss[buf * BR + il], e < 2 ? ks0 : ks1, off,
                                          causal, window));
        const float pe = ok ? __expf(p[4 * n + e] * scale - lt[il]) : 0.f;
        p[4 * n + e] = pe;
        dp[4 * n + e] = pe * (dp[4 * n + e] - dlt[il]) * scale;  // dS^T
      }
    }
    // P^T and dS^T as bf16 A fragments; dS^T also to shared memory ([key][query], SW128): the
    // fragment registers of k-step kk are rows g / g + 8 of queries 16·kk + 2t and + 8.
    uint32_t pa[BR / 16][4], sa[BR / 16][4];
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      acc_to_a(p, kk, pa[kk]);
      acc_to_a(dp, kk, sa[kk]);
      const int r0 = wg * 64 + wl * 16 + g, r1 = r0 + 8;
      uint32_t* d0 = reinterpret_cast<uint32_t*>(dst + r0 * 64 + 2 * t);
      uint32_t* d1 = reinterpret_cast<uint32_t*>(dst + r1 * 64 + 2 * t);
      d0[(((2 * kk) ^ (r0 % 8)) * 8) / 2] = sa[kk][0];
      d1[(((2 * kk) ^ (r1 % 8)) * 8) / 2] = sa[kk][1];
      d0[(((2 * kk + 1) ^ (r0 % 8)) * 8) / 2] = sa[kk][2];
      d1[(((2 * kk + 1) ^ (r1 % 8)) * 8) / 2] = sa[kk][3];
    }
    fence_proxy_async();
    __syncthreads();
    pin<BR / 4>(&pa[0][0]);
    pin<BR / 4>(&sa[0][0]);
    wg_fence();
    // dV += P^T·dO, dK += dS^T·Q (k = the step's 64 queries; dO and Q read N-major).
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      wgmma_rs_tn(dva, pa[kk], sw128_desc(dot + kk * 16 * 64, BR * 128));
      wgmma_rs_tn(dka, sa[kk], sw128_desc(qt + kk * 16 * 64, BR * 128));
    }
    wg_commit();
    // Waiting here frees the fragments' registers before dQ's accumulator is needed (the
    // other warpgroup keeps the tensor cores busy meanwhile).
    wg_wait0();
    pin<D / 2>(dva);
    pin<D / 2>(dka);
    pin<BR / 4>(&pa[0][0]);
    pin<BR / 4>(&sa[0][0]);
    // dQ (64 queries × this warpgroup's 64 columns) = dS·K over the CTA's 128 keys: dS^T
    // read M-major, K's column block `wg` read N-major.
    float dqa[32];
#pragma unroll
    for (int i = 0; i < 32; i++) dqa[i] = 0.f;
    pin<32>(dqa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++)
      wgmma_ss64<1>(dqa, sw128_desc(dst + kk * 16 * 64, BC * 128),
                    sw128_desc(ks + wg * BC * 64 + kk * 16 * 64, BC * 128));
    wg_commit();
    wg_wait0();
    pin<32>(dqa);
    {
      const int ra = i0 + wl * 16 + g, rc = ra + 8;
      float* dqb = dq + ((long)b * T * H + h) * D + wg * 64 + 2 * t;
#pragma unroll
      for (int n = 0; n < 8; n++) {
        if (ra < T)
          atomicAdd(reinterpret_cast<float2*>(dqb + ra * qstride + n * 8),
                    make_float2(dqa[4 * n], dqa[4 * n + 1]));
        if (rc < T)
          atomicAdd(reinterpret_cast<float2*>(dqb + rc * qstride + n * 8),
                    make_float2(dqa[4 * n + 2], dqa[4 * n + 3]));
      }
    }
    // Every warpgroup is done with this step's buffers and dS^T before the next loads.
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    const int col = n * 8 + 2 * t;
    if (k0 < S) {
      const long r = (((long)b * S + k0) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[4 * n], dka[4 * n + 1]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[4 * n], dva[4 * n + 1]);
    }
    if (k1 < S) {
      const long r = (((long)b * S + k1) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[4 * n + 2], dka[4 * n + 3]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[4 * n + 2], dva[4 * n + 3]);
    }
  }
}

// The layout probe, one warpgroup (128 threads), WG_PROBE_SMEM bytes of dynamic shared memory:
// a (64 × 128) and bk (128 × 128) bf16, row major, in the SW128 layout; each output (f32, row
// major, written from the accumulator fragments) is one way the attention kernels use wgmma:
//   s   = a·bk^T             (64 × 128) the forward's S = Q·K^T: both K-major;
//   o   = a·bk               (64 × 128) the forward's O += P·V: A from registers, bk N-major;
//   s64 = bk[64:]·a^T        (64 × 64)  the backward's S^T = K·Q^T: A 64 rows into a tile;
//   o64 = bk[:64, :64]·a     (64 × 128) the backward's dV += P^T·dO: B a 64-row tile N-major;
//   q64 = bk[:, :64]^T·bk[:, 64:] (64 × 64) the backward's dQ = dS·K: A M-major, B N-major.
#define WG_PROBE_SMEM (1024 + 2 * (64 * 128 + 128 * 128))

// A warpgroup's 64 × N f32 accumulator fragments to out, row major.
template <int N>
__device__ __forceinline__ void store_acc(float* out, const float* acc, int wl, int g, int t) {
  const int r = 16 * wl + g;
#pragma unroll
  for (int n = 0; n < N / 8; n++) {
    const int c = 8 * n + 2 * t;
    *reinterpret_cast<float2*>(out + r * N + c) = make_float2(acc[4 * n], acc[4 * n + 1]);
    *reinterpret_cast<float2*>(out + (r + 8) * N + c) = make_float2(acc[4 * n + 2], acc[4 * n + 3]);
  }
}

// The A fragments of KSTEPS k-steps of rows 16·wl + g and + 8 of a row-major bf16 matrix.
template <int KSTEPS>
__device__ __forceinline__ void a_frags(uint32_t (*f)[4], const bf16* m, int ld, int wl, int g,
                                        int t) {
  const bf16* ra = m + (16 * wl + g) * ld;
  const bf16* rb = ra + 8 * ld;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; kk++) {
    f[kk][0] = ld32(ra + kk * 16 + 2 * t);
    f[kk][1] = ld32(rb + kk * 16 + 2 * t);
    f[kk][2] = ld32(ra + kk * 16 + 8 + 2 * t);
    f[kk][3] = ld32(rb + kk * 16 + 8 + 2 * t);
  }
}

extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe(const bf16* __restrict__ a, const bf16* __restrict__ bk, float* __restrict__ s_out,
                float* __restrict__ o_out, float* __restrict__ s64_out,
                float* __restrict__ o64_out, float* __restrict__ q64_out) {
  DYN_SMEM(1024, wg_raw);
  bf16* as = aligned_smem(wg_raw);  // 64 × 128
  bf16* bs = as + 64 * 128;         // 128 × 128
  const int tid = threadIdx.x, wl = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  load_sw128(as, a, 128, 0, 64, 64, tid, 128);
  load_sw128(bs, bk, 128, 0, 128, 128, tid, 128);
  cp_commit();
  cp_wait<0>();
  fence_proxy_async();
  __syncthreads();
  {
    float s[64], acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) s[i] = acc[i] = 0.f;
    uint32_t pa[8][4];
    a_frags<8>(pa, a, 128, wl, g, t);
    pin<64>(s);
    pin<64>(acc);
    pin<32>(&pa[0][0]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss(s, sw128_desc(as + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16),
               sw128_desc(bs + (kk / 4) * 128 * 64 + (kk % 4) * 16, 16));
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_rs_tn(acc, pa[kk], sw128_desc(bs + kk * 16 * 64, 128 * 128));
    wg_commit();
    wg_wait0();
    pin<64>(s);
    pin<64>(acc);
    pin<32>(&pa[0][0]);
    store_acc<128>(s_out, s, wl, g, t);
    store_acc<128>(o_out, acc, wl, g, t);
  }
  {
    float s64[32], q64[32], o64[64];
#pragma unroll
    for (int i = 0; i < 32; i++) s64[i] = q64[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 64; i++) o64[i] = 0.f;
    uint32_t pb[4][4];
    a_frags<4>(pb, bk, 128, wl, g, t);
    pin<32>(s64);
    pin<32>(q64);
    pin<64>(o64);
    pin<16>(&pb[0][0]);
    wg_fence();
    const bf16* b_hi = bs + 64 * 64;  // rows 64.. of bk, in each column block
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss64<0>(s64, sw128_desc(b_hi + (kk / 4) * 128 * 64 + (kk % 4) * 16, 16),
                    sw128_desc(as + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16));
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
      wgmma_rs_tn(o64, pb[kk], sw128_desc(as + kk * 16 * 64, 64 * 128));
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss64<1>(q64, sw128_desc(bs + kk * 16 * 64, 128 * 128),
                    sw128_desc(bs + 128 * 64 + kk * 16 * 64, 128 * 128));
    wg_commit();
    wg_wait0();
    pin<32>(s64);
    pin<32>(q64);
    pin<64>(o64);
    pin<16>(&pb[0][0]);
    store_acc<64>(s64_out, s64, wl, g, t);
    store_acc<128>(o64_out, o64, wl, g, t);
    store_acc<64>(q64_out, q64, wl, g, t);
  }
}
