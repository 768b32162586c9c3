// attn_common.cuh: what the attention kernels (flash_mma.cu, flash_wgmma_sm90a.cu,
// wgmma_probe_sm90a.cu) share: shared-memory addresses and cp.async (inline PTX), the bf16
// pair packing and the mask. With OMR_EMU defined (the header to include instead),
// scripts/cuda/emu runs the kernels on the CPU with its own versions of the inline-PTX
// helpers, each the PTX ISA's documented semantics.
#pragma once

#ifdef OMR_EMU
#include OMR_EMU
#else
#include "common.cuh"

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// cp.async of 16 (or 4) bytes; `valid` false writes zeros instead (src-size 0).
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

// 2^x by the SFU alone (ex2.approx.ftz): exp2f adds a range test and two multiplies per call
// to produce subnormal results, which a softmax weight below 2^-126 of its row's largest does
// not need (flushed to 0, as a subnormal x is read as 0).
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // OMR_EMU

#define NEG_INF (-__int_as_float(0x7f800000))
#define LOG2E_F 1.4426950408889634f
// The forwards' lazy rescaling bound: a weight may reach 2^8 before the running maximum moves.
#define LAZY_LOG2 8.f

// Two floats as a bf16 pair: `lo` in the low half (the lower column / k index).
__device__ __forceinline__ uint32_t pack_f(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A backward's weight and its score gradient: s ← P = 2^(s·scale·log2 e − lse·log2 e) and
// dp ← dS = P·(dP − Δ)·scale (scale_log2 = scale·log2 e).
__device__ __forceinline__ void p_ds(float& s, float& dp, float lse, float delta, float scale_log2,
                                     float scale) {
  s = ex2(fmaf(s, scale_log2, -lse * LOG2E_F));
  dp = s * (dp - delta) * scale;
}

__device__ __forceinline__ bool allowed(int i, int j, unsigned qs, unsigned ks, int off,
                                        int causal, int window) {
  return qs != 0u && qs == ks && (!causal || j <= i + off) && (window == 0 || j + window > i + off);
}

// What a forward's tile did to its rows' running maxima: O's rows are rescaled by a0 / a1
// unless `lazy` (no maximum moved).
struct Rescale {
  bool lazy;
  float a0, a1;
};

// The forwards' online softmax of one tile (flash_mma's flash_fwd per m-tile, flash_wgmma's
// wg_fwd): the thread's BC / 2 scores s, element 4n + e of row r0 (e < 2, segment qs0) or
// r0 + 8 (qs1) and key j0 + 8n + 2t + (e & 1) (segment kss[8n + 2t + (e & 1)]), become their
// weights 2^(s·scale_log2 − m·scale_log2); unless the tile is whole, masked scores are −∞
// first. Maxima of the unscaled scores (the scale is positive: flash_mma.rs), so one FMA per
// weight. Lazy rescaling: while no row of the warp has a score above its running maximum m by
// more than LAZY_LOG2 (weights up to 2^LAZY_LOG2, exact in f32 sums), the maxima stay and O
// and the sums l are not rescaled; a row with nothing summed yet has m = −∞ and takes its
// maximum (−∞ − −∞ is NaN: not lazy). The rescale is 1 while nothing was summed (the sums are
// 0 then); a row with no allowed key yet subtracts 0 instead of −∞ (its scores are all
// −∞ → 0). Updates m and l; O's rescale is the caller's (rescale_o), after its own waits.
template <int BC>
__device__ __forceinline__ Rescale softmax_tile(float* s, float& m0, float& m1, float& l0,
                                                float& l1, bool whole, int j0, int r0,
                                                unsigned qs0, unsigned qs1, const unsigned* kss,
                                                int S, int T, int off, int causal, int window,
                                                int t, float scale_log2) {
  if (!whole) {
#pragma unroll
    for (int n = 0; n < BC / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const bool top = e < 2;
        const int jl = n * 8 + 2 * t + (e & 1), j = j0 + jl, i = top ? r0 : r0 + 8;
        if (!(j < S && i < T && allowed(i, j, top ? qs0 : qs1, kss[jl], off, causal, window)))
          s[4 * n + e] = NEG_INF;
      }
  }
  float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
  for (int n = 0; n < BC / 8; n++) {
    mx0 = fmaxf(mx0, fmaxf(s[4 * n + 0], s[4 * n + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[4 * n + 2], s[4 * n + 3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const bool lazy = __all_sync(0xffffffffu, (mx0 - m0) * scale_log2 <= LAZY_LOG2 &&
                                                (mx1 - m1) * scale_log2 <= LAZY_LOG2);
  const float mn0 = lazy ? m0 : fmaxf(m0, mx0), mn1 = lazy ? m1 : fmaxf(m1, mx1);
  const Rescale r{lazy, lazy || mn0 == NEG_INF ? 1.f : ex2((m0 - mn0) * scale_log2),
                  lazy || mn1 == NEG_INF ? 1.f : ex2((m1 - mn1) * scale_log2)};
  const float z0 = mn0 == NEG_INF ? 0.f : mn0 * scale_log2;
  const float z1 = mn1 == NEG_INF ? 0.f : mn1 * scale_log2;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int n = 0; n < BC / 8; n++) {
    s[4 * n + 0] = ex2(fmaf(s[4 * n + 0], scale_log2, -z0));
    s[4 * n + 1] = ex2(fmaf(s[4 * n + 1], scale_log2, -z0));
    s[4 * n + 2] = ex2(fmaf(s[4 * n + 2], scale_log2, -z1));
    s[4 * n + 3] = ex2(fmaf(s[4 * n + 3], scale_log2, -z1));
    sum0 += s[4 * n + 0] + s[4 * n + 1];
    sum1 += s[4 * n + 2] + s[4 * n + 3];
  }
  l0 = l0 * r.a0 + sum0;
  l1 = l1 * r.a1 + sum1;
  m0 = mn0;
  m1 = mn1;
  return r;
}

// O's rows (a thread's D / 2 accumulators, element 4n + e of row r0 (e < 2) or r0 + 8) by the
// tile's rescale.
template <int D>
__device__ __forceinline__ void rescale_o(float* acc, Rescale r) {
  if (r.lazy) return;
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    acc[4 * n + 0] *= r.a0;
    acc[4 * n + 1] *= r.a0;
    acc[4 * n + 2] *= r.a1;
    acc[4 * n + 3] *= r.a1;
  }
}

// A compile-time flag for code written once for the whole-tile and the masked case.
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// P^T and dS^T of a backward tile of 16 keys × BR queries held as mma accumulator fragments
// (flash_mma's flash_bwd, flash_wgmma's wg_bwd): element 4n + e of a thread is query
// i0 + 8n + 2t + (e & 1) and key k0 (e < 2, segment ks0) or k0 + 8 (ks1); lt, dlt, qs are the
// step's lse, Δ and query segments. MASKED tests each weight (a masked one is 0); a whole tile
// is computed without.
template <bool MASKED, int BR>
__device__ __forceinline__ void pt_dst(float* p, float* dp, const float* lt, const float* dlt,
                                       const unsigned* qs, int i0, int k0, unsigned ks0,
                                       unsigned ks1, int T, int S, int off, int causal,
                                       int window, int t, float scale_log2, float scale) {
#pragma unroll
  for (int n = 0; n < BR / 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int il = n * 8 + 2 * t + (e & 1), i = i0 + il, j = e < 2 ? k0 : k0 + 8;
      if (MASKED &&
          !(i < T && j < S && allowed(i, j, qs[il], e < 2 ? ks0 : ks1, off, causal, window)))
        p[4 * n + e] = dp[4 * n + e] = 0.f;
      else
        p_ds(p[4 * n + e], dp[4 * n + e], lt[il], dlt[il], scale_log2, scale);
    }
}
