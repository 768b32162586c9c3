// mma_sync.cuh: the mma.sync kernels' (flash_mma.cu) fragment and tile helpers: mma.sync
// m16n8k16 and ldmatrix (inline PTX; scripts/cuda/emu's with OMR_EMU), C fragments to A,
// A fragments and padded tiles from global memory, the backward's query side (QSide), its
// dQ atomics and dK / dV stores. Fragment layouts: flash_mma.cu's header.
#pragma once

#include "attn_common.cuh"
// The inline-PTX helpers of this file: mma.sync and ldmatrix (scripts/cuda/emu's with OMR_EMU).
#ifndef OMR_EMU
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m holds it.
__device__ __forceinline__ void ldsm4(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm4t(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm2t(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
#endif  // OMR_EMU

// The A fragment of k-step kk from C fragments c[2kk], c[2kk+1] (rows × 16 columns).
__device__ __forceinline__ void c_to_a(const float (*c)[4], int kk, uint32_t* a) {
  a[0] = pack_f(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_f(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_f(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_f(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// f32 atomic adds of two / four consecutive floats (8- / 16-byte aligned): one vector atomic
// on sm_90 and newer, scalar atomics before (sm_80 has no float2 / float4 atomicAdd).
__device__ __forceinline__ void atomic_add2(float* p, float2 v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
#endif
}
__device__ __forceinline__ void atomic_add4(float* p, float4 v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

// Adds a warp's dQ fragments, 16 rows from `r0` × N n-tiles of 8 columns from `c0`, into
// dq (f32; element (row, col) at dq[row · rstride + col]) with f32 atomics; rows at or past T
// are left out. DQV = 2: a float2 per row and column pair; DQV = 4: lanes t and t ^ 1 swap
// halves first, so that the even lane adds 4 columns of row r0 + g and the odd lane 4 of row
// r0 + g + 8, one float4 each (half the atomic operations).
template <int DQV, int N>
__device__ __forceinline__ void add_dq(float* dq, long rstride, const float (*acc)[4], int r0,
                                       int c0, int T, int g, int t) {
  // One address and one bound test per row, outside the n-tile loops (before: both per atomic).
  const int ra = r0 + g, rc = ra + 8;
  if (DQV == 4) {
    const bool odd = t & 1;
    const int row = odd ? rc : ra;
    float* p = dq + (long)row * rstride + c0 + 2 * (t & ~1);
#pragma unroll
    for (int n = 0; n < N; n++) {
      // Every lane shuffles; the test only predicates the atomic.
      const float x0 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][0] : acc[n][2], 1);
      const float x1 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][1] : acc[n][3], 1);
      const float4 val = odd ? make_float4(x0, x1, acc[n][2], acc[n][3])
                             : make_float4(acc[n][0], acc[n][1], x0, x1);
      if (row < T) atomic_add4(p + n * 8, val);
    }
  } else {
    float* pa = dq + (long)ra * rstride + c0 + 2 * t;
    if (ra < T) {
#pragma unroll
      for (int n = 0; n < N; n++) atomic_add2(pa + n * 8, make_float2(acc[n][0], acc[n][1]));
    }
    if (rc < T) {
      float* pc = pa + 8 * rstride;
#pragma unroll
      for (int n = 0; n < N; n++) atomic_add2(pc + n * 8, make_float2(acc[n][2], acc[n][3]));
    }
  }
}

// A fragments (16 rows × D) straight from global memory: rows g and g + 8 of the tile are
// `r0` and `r1`, one 16-column k-step per kk.
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t (*f)[4], const bf16* r0, const bf16* r1,
                                             int t) {
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    f[kk][0] = ld32(r0 + kk * 16 + 2 * t);
    f[kk][1] = ld32(r1 + kk * 16 + 2 * t);
    f[kk][2] = ld32(r0 + kk * 16 + 8 + 2 * t);
    f[kk][3] = ld32(r1 + kk * 16 + 8 + 2 * t);
  }
}

// ROWS rows of D bf16 starting at global row `r0` (row r at src + r·stride) into a padded
// shared tile (row pitch LD), by the CTA's NT threads; rows at or past `n` are zeros. When NT
// is a multiple of the row's D / 8 16-byte chunks (D 64 and 128), each thread copies the same
// chunk of every (NT / (D / 8))-th row: the loop unrolls to one address add per copy, and a
// tile wholly before `n` needs no bound checks. ROLL keeps the plain loop (flash_bwd64's
// query side: at the 255-register cap, the unrolled copies made it spill 8 bytes).
template <int D, int LD, int ROWS, int NT, bool ROLL = false>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, long stride, int r0, int n) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  if constexpr (NT % C == 0 && !ROLL) {
    constexpr int RS = NT / C, K = (ROWS + RS - 1) / RS;
    const int c = threadIdx.x % C, row0 = threadIdx.x / C;
    const bf16* s = src + (long)(r0 + row0) * stride + c * 8;
    const long step = (long)RS * stride;
    bf16* d = dst + row0 * LD + c * 8;
    if (r0 + ROWS <= n) {
#pragma unroll
      for (int k = 0; k < K; k++)
        if (ROWS % RS == 0 || row0 + k * RS < ROWS) cp16(d + k * RS * LD, s + k * step, true);
    } else {
#pragma unroll
      for (int k = 0; k < K; k++) {
        const int row = row0 + k * RS;
        if (ROWS % RS == 0 || row < ROWS) {
          const bool ok = r0 + row < n;
          cp16(d + k * RS * LD, ok ? s + k * step : src + c * 8, ok);
        }
      }
    }
  } else {
    // D 80: a thread's chunk changes from row to row. Kept a loop: unrolled, it cost the
    // backward 53 registers (167 → 220), a third of its resident CTAs.
#pragma unroll 1
    for (int idx = threadIdx.x; idx < ROWS * C; idx += NT) {
      const int row = idx / C, c = idx % C, r = r0 + row;
      const bool ok = r < n;
      cp16(&dst[row * LD + c * 8], src + (long)(ok ? r : 0) * stride + c * 8, ok);
    }
  }
}

// The backward's query side of one (b, h): each step's Q and dO rows, lse, Δ and segment ids,
// loaded by cp.async into buffer `buf` (BR rows) of their shared tiles by the CTA's NT threads
// (ROLL: see load_rows); thread r copies row r's scalars, so it may read them after its own
// wait.
template <int D, int LD, int BR, int NT, bool ROLL = false>
struct QSide {
  const bf16* q;
  const bf16* dout;
  const float* lse;
  const float* delta;
  const unsigned* qseg;
  bf16* qs;       // [2][BR × LD]
  bf16* dos;      // [2][BR × LD]
  float* lses;    // [2][BR]
  float* dls;     // [2][BR]
  unsigned* qss;  // [2][BR]
  int T;
  long stride;

  __device__ __forceinline__ QSide(const bf16* q_, const bf16* dout_, const float* lse_,
                                   const float* delta_, const unsigned* qseg_, bf16* qs_,
                                   bf16* dos_, float* lses_, float* dls_, unsigned* qss_, int b,
                                   int h, int T_, int H)
      : q(q_ + ((long)b * T_ * H + h) * D),
        dout(dout_ + ((long)b * T_ * H + h) * D),
        lse(lse_ + ((long)b * H + h) * T_),
        delta(delta_ + ((long)b * H + h) * T_),
        qseg(qseg_ + (long)b * T_),
        qs(qs_),
        dos(dos_),
        lses(lses_),
        dls(dls_),
        qss(qss_),
        T(T_),
        stride((long)H * D) {}

  // Rows [i0, i0 + BR) into buffer `buf`.
  __device__ __forceinline__ void load(int i0, int buf) const {
    load_rows<D, LD, BR, NT, ROLL>(qs + buf * BR * LD, q, stride, i0, T);
    load_rows<D, LD, BR, NT, ROLL>(dos + buf * BR * LD, dout, stride, i0, T);
    if (threadIdx.x < BR) {
      const int i = i0 + threadIdx.x;
      const bool ok = i < T;
      const int ic = ok ? i : 0;
      cp4(&lses[buf * BR + threadIdx.x], lse + ic, ok);
      cp4(&dls[buf * BR + threadIdx.x], delta + ic, ok);
      cp4(&qss[buf * BR + threadIdx.x], qseg + ic, ok);
    }
  }
};

// dK and dV of one m-tile of keys (rows k0 and k0 + 8 of C fragments; N n-tiles of 8
// columns from c0), f32 per query head: element (key, col) at [((b·S + key)·H + h)·D + col].
// Keys at or past S are left out.
template <int D, int N>
__device__ __forceinline__ void store_dkv(float* dk, float* dv, const float (*dka)[4],
                                          const float (*dva)[4], int k0, int c0, int b, int h,
                                          int S, int H, int t) {
  const int k1 = k0 + 8;
#pragma unroll
  for (int n = 0; n < N; n++) {
    const int col = c0 + n * 8 + 2 * t;
    if (k0 < S) {
      const long r = (((long)b * S + k0) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[n][0], dka[n][1]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[n][0], dva[n][1]);
    }
    if (k1 < S) {
      const long r = (((long)b * S + k1) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[n][2], dka[n][3]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[n][2], dva[n][3]);
    }
  }
}
