// rmsnorm.cu: Qwen2RMSNorm forward and backward over rows of C features.
//   forward  y = round_T(x · r) · w,  r = 1 / sqrt(mean(x²) + eps)          x, y: (R, C), w: (C)
//   backward dx = r · (dn − n · mean(dn · n)),  dn = dy · w,  n = x · r
//            dw = Σ_rows dy · round_T(n)  (per-block partial rows, then rmsnorm_dw sums them)
// Choices: f32 arithmetic whatever T is; the statistic r is recomputed in the backward instead
// of being saved. Memory-bound, so laid out for bandwidth: a block is blockDim.y row groups of
// tpr = blockDim.x threads, each group one row at a time; a row is cut into accesses of N
// elements (16 bytes, N = 8 bf16 / 4 f32, when C is a multiple of N and every pointer is
// 16-byte aligned; else N = 1) and thread tx owns accesses a = tx + k·tpr, k < VPT (columns
// a·N … a·N + N − 1), the same in every row. On the 16-byte path every load of the row is
// issued before the first sum and the row stays in registers until the output, so x and dy
// are read from memory once; the scalar fallback reads the row again (from L1/L2). Sums over
// a row in a fixed order (deterministic). The backward's grid is one wave of resident blocks;
// each group keeps dw for its columns in shared memory over all the rows it sees, the groups
// of a block add theirs into one partial row in order, and rmsnorm_dw sums the partial rows
// (no atomics: deterministic).
#include "common.cuh"

// Forward: 16-byte accesses per thread held in registers (32 bf16 / 16 f32 columns); a longer
// row's other accesses are streamed, read once for the statistic and once for the output.
constexpr int kFwdVec = 4;
// Backward: 16-byte accesses per thread (24 bf16 / 12 f32 columns); the whole row must be
// covered, C ≤ blockDim.x · kBwdVec · N: the launcher (rmsnorm.rs) sizes blockDim.x so.
constexpr int kBwdVec = 3;

// y = round_T(x · rs) · w over N values (the rounding two at a time when N is even).
template <typename T, int N>
__device__ __forceinline__ void scale_round_mul(const float (&xf)[N], float rs,
                                                const float (&wf)[N], float (&yf)[N]) {
  if constexpr (N % 2 == 0) {
#pragma unroll
    for (int e = 0; e < N; e += 2) {
      float a = xf[e] * rs, b = xf[e + 1] * rs;
      round_as2<T>(a, b);
      yf[e] = a * wf[e];
      yf[e + 1] = b * wf[e + 1];
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) yf[e] = round_as<T>(xf[e] * rs) * wf[e];
  }
}

template <typename T, int N, int VPT>
__device__ void fwd_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                         int rows, int C, float inv_c, float eps) {
  constexpr bool kCache = N > 1;  // 16-byte path: x and w stay in registers for the output
  __shared__ float2 sh[2][32];
  const int tpr = blockDim.x, tx = threadIdx.x, G = blockDim.y;
  const int na = C / N, nreg = VPT * tpr;  // accesses per row; those held in registers
  int buf = 0;
  for (long r0 = (long)blockIdx.x * G; r0 < rows; r0 += (long)gridDim.x * G, buf ^= 1) {
    const long r = r0 + threadIdx.y;
    const bool live = r < rows;  // a group past the last row still joins the barrier
    const T* xr = x + (size_t)r * C;
    T* yr = y + (size_t)r * C;
    Pack<T, N> xv[VPT], wv[VPT];
    // Every load of the row first (VPT · 16 bytes in flight per thread), then the sums.
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int a = tx + k * tpr;
      if (live && a < na) {
        xv[k].load(xr + a * N);
        if (kCache) wv[k].load(w + a * N);
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (live && tx + k * tpr < na) {
        float f[N];
        xv[k].unpack(f);
#pragma unroll
        for (int e = 0; e < N; ++e) ss += f[e] * f[e];
      }
    }
    for (int a = nreg + tx; live && a < na; a += tpr) {
      Pack<T, N> p;
      p.load(xr + a * N);
      float f[N];
      p.unpack(f);
#pragma unroll
      for (int e = 0; e < N; ++e) ss += f[e] * f[e];
    }
    const float rs = 1.f / sqrtf(group_sum2(make_float2(ss, 0.f), sh[buf]).x * inv_c + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int a = tx + k * tpr;
      if (live && a < na) {
        if (!kCache) {
          xv[k].load(xr + a * N);
          wv[k].load(w + a * N);
        }
        float xf[N], wf[N], yf[N];
        xv[k].unpack(xf);
        wv[k].unpack(wf);
        scale_round_mul<T>(xf, rs, wf, yf);
        Pack<T, N>::store(yr + a * N, yf);
      }
    }
    for (int a = nreg + tx; live && a < na; a += tpr) {
      Pack<T, N> xp, wp;
      xp.load(xr + a * N);
      wp.load(w + a * N);
      float xf[N], wf[N], yf[N];
      xp.unpack(xf);
      wp.unpack(wf);
      scale_round_mul<T>(xf, rs, wf, yf);
      Pack<T, N>::store(yr + a * N, yf);
    }
  }
}

// dw_part: (gridDim.x, C) f32, row b the sum over the rows block b saw. 16-byte path only
// (N > 1, N even): x and dy stay in registers between the sums and dx. Dynamic shared memory:
// blockDim.y · C floats, each group's dw accumulators, laid out [N/4][C/N] float4 so that a
// warp's accesses are consecutive (no bank conflicts), then w (C elements of T). Thread tx
// owns the same accesses in every row, so its accumulators need no barrier until the groups
// are added up at the end. (Out of registers, they leave room for the row's x and dy and more
// rows per multiprocessor.)
template <typename T, int N, int VPT>
__device__ void bwd_rows(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ dy, T* __restrict__ dx,
                         float* __restrict__ dw_part, int rows, int C, float inv_c, float eps) {
  constexpr int Q = N / 4;  // float4 accumulators per access
  DYN_SMEM_OF(float4, acc_sh);
  __shared__ float2 sh[2][32];
  const int tpr = blockDim.x, tx = threadIdx.x, G = blockDim.y;
  const int na = C / N;  // ≤ VPT · tpr (the launcher's promise)
  float4* acc = acc_sh + (size_t)threadIdx.y * Q * na;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int a = tx + k * tpr;
    if (a < na)
#pragma unroll
      for (int q = 0; q < Q; ++q) acc[q * na + a] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  // w once per block, after the accumulators: read twice per row, it would otherwise come
  // from L2 (the L1 left beside this shared memory does not keep it), adding about half again
  // to the L2 traffic of x, dy and dx.
  T* w_sh = reinterpret_cast<T*>(acc_sh + (size_t)G * Q * na);
  for (int a = threadIdx.y * tpr + tx; a < na; a += tpr * G) {
    Pack<T, N> p;
    p.load(w + a * N);
    p.store_raw(w_sh + a * N);
  }
  __syncthreads();
  int buf = 0;
  for (long r0 = (long)blockIdx.x * G; r0 < rows; r0 += (long)gridDim.x * G, buf ^= 1) {
    const long r = r0 + threadIdx.y;
    const bool live = r < rows;  // a group past the last row still joins the barrier
    const size_t off = (size_t)r * C;
    Pack<T, N> xv[VPT], gv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int a = tx + k * tpr;
      if (live && a < na) {
        xv[k].load(x + off + a * N);
        gv[k].load(dy + off + a * N);
      }
    }
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int a = tx + k * tpr;
      if (live && a < na) {
        Pack<T, N> wv;
        wv.load(w_sh + a * N);
        float xf[N], gf[N], wf[N];
        xv[k].unpack(xf);
        gv[k].unpack(gf);
        wv.unpack(wf);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          ss += xf[e] * xf[e];
          dot += gf[e] * wf[e] * xf[e];
        }
      }
    }
    const float2 s = group_sum2(make_float2(ss, dot), sh[buf]);
    const float rs = 1.f / sqrtf(s.x * inv_c + eps);
    // mean(dn · n) = rs · Σ dn·x / C
    const float m = s.y * rs * inv_c;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int a = tx + k * tpr;
      if (live && a < na) {
        Pack<T, N> wv;
        wv.load(w_sh + a * N);
        float xf[N], gf[N], wf[N], df[N], dwf[N];
        xv[k].unpack(xf);
        gv[k].unpack(gf);
        wv.unpack(wf);
#pragma unroll
        for (int e = 0; e < N; e += 2) {
          const float n0 = xf[e] * rs, n1 = xf[e + 1] * rs;
          df[e] = rs * (gf[e] * wf[e] - n0 * m);
          df[e + 1] = rs * (gf[e + 1] * wf[e + 1] - n1 * m);
          float q0 = n0, q1 = n1;
          round_as2<T>(q0, q1);
          dwf[e] = gf[e] * q0;
          dwf[e + 1] = gf[e + 1] * q1;
        }
        Pack<T, N>::store(dx + off + a * N, df);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          float4 t = acc[q * na + a];
          t.x += dwf[4 * q];
          t.y += dwf[4 * q + 1];
          t.z += dwf[4 * q + 2];
          t.w += dwf[4 * q + 3];
          acc[q * na + a] = t;
        }
      }
    }
  }
  // The block's partial row: column c = a·N + e, the groups added in order.
  __syncthreads();
  const float* accf = reinterpret_cast<const float*>(acc_sh);
  for (int c = threadIdx.y * tpr + tx; c < C; c += tpr * G) {
    const int a = c / N, e = c % N;
    const int i = ((e >> 2) * na + a) * 4 + (e & 3);
    float t = 0.f;
    for (int g = 0; g < G; ++g) t += accf[(size_t)g * C + i];
    dw_part[(size_t)blockIdx.x * C + c] = t;
  }
}

// The backward for any C and alignment (the fallback): group 0 of each block alone takes the
// block's rows (the other groups only join the barriers), one element per access, x and dy
// read twice, dw accumulated in the block's partial row in global memory (each thread owns
// its columns, so no races and no barrier).
template <typename T>
__device__ void bwd_rows_scalar(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ dy, T* __restrict__ dx,
                                float* __restrict__ dw_part, int rows, int C, float inv_c,
                                float eps) {
  __shared__ float2 sh[2][32];
  const int tpr = blockDim.x, tx = threadIdx.x;
  const bool mine = threadIdx.y == 0;
  float* part = dw_part + (size_t)blockIdx.x * C;
  if (mine)
    for (int c = tx; c < C; c += tpr) part[c] = 0.f;
  int buf = 0;
  for (long r = blockIdx.x; r < rows; r += gridDim.x, buf ^= 1) {
    const T* xr = x + (size_t)r * C;
    const T* gr = dy + (size_t)r * C;
    T* dxr = dx + (size_t)r * C;
    float ss = 0.f, dot = 0.f;
    if (mine)
      for (int c = tx; c < C; c += tpr) {
        const float v = to_f(xr[c]);
        ss += v * v;
        dot += to_f(gr[c]) * to_f(w[c]) * v;
      }
    const float2 s = group_sum2(make_float2(ss, dot), sh[buf]);
    const float rs = 1.f / sqrtf(s.x * inv_c + eps);
    const float m = s.y * rs * inv_c;
    if (mine)
      for (int c = tx; c < C; c += tpr) {
        const float g = to_f(gr[c]);
        const float n = to_f(xr[c]) * rs;
        dxr[c] = from_f<T>(rs * (g * to_f(w[c]) - n * m));
        part[c] += g * round_as<T>(n);
      }
  }
}

template <typename T>
__device__ void rmsnorm_fwd(const T* x, const T* w, T* y, int rows, int C, float inv_c,
                            float eps) {
  constexpr int V = Vec16<T>::n;
  if (C % V == 0 && aligned16(x) && aligned16(w) && aligned16(y))
    fwd_rows<T, V, kFwdVec>(x, w, y, rows, C, inv_c, eps);
  else  // one element per access, one in registers: the row is streamed twice
    fwd_rows<T, 1, 1>(x, w, y, rows, C, inv_c, eps);
}

template <typename T>
__device__ void rmsnorm_bwd(const T* x, const T* w, const T* dy, T* dx, float* dw_part, int rows,
                            int C, float inv_c, float eps) {
  constexpr int V = Vec16<T>::n;
  if (C % V == 0 && aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx))
    bwd_rows<T, V, kBwdVec>(x, w, dy, dx, dw_part, rows, C, inv_c, eps);
  else
    bwd_rows_scalar<T>(x, w, dy, dx, dw_part, rows, C, inv_c, eps);
}

// dw[c] = Σ_p dw_part[p, c] in a fixed order. Block (32, 32): lane x takes column
// blockIdx.x · 32 + x (a warp reads 128 contiguous bytes of a partial row), thread row y the
// partial rows p ≡ y (mod 32); then row 0 adds the 32 slices in order.
template <typename T>
__device__ void rmsnorm_dw(const float* __restrict__ part, T* __restrict__ dw, int P, int C) {
  __shared__ float sh[32][32];
  const int c = blockIdx.x * 32 + threadIdx.x, step = blockDim.y;
  float s = 0.f;
  if (c < C) {
    // Four loads in flight before their sums (the rows are L2 hits; latency-bound otherwise).
    int p = threadIdx.y;
    for (; p + 3 * step < P; p += 4 * step) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = part[(size_t)(p + i * step) * C + c];
#pragma unroll
      for (int i = 0; i < 4; ++i) s += v[i];
    }
    for (; p < P; p += step) s += part[(size_t)p * C + c];
  }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
    for (int i = 0; i < (int)blockDim.y; ++i) t += sh[i][threadIdx.x];
    dw[c] = from_f<T>(t);
  }
}

// Row kernels take blocks of up to 1024 threads (blockDim (tpr, groups)), hence the bound.
#define ENTRIES(T, S)                                                                            \
  extern "C" __global__ void __launch_bounds__(1024)                                             \
      rmsnorm_fwd_##S(const T* x, const T* w, T* y, int rows, int C, float inv_c, float eps) {  \
    rmsnorm_fwd<T>(x, w, y, rows, C, inv_c, eps);                                               \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                             \
      rmsnorm_bwd_##S(const T* x, const T* w, const T* dy, T* dx, float* dw_part, int rows,     \
                      int C, float inv_c, float eps) {                                           \
    rmsnorm_bwd<T>(x, w, dy, dx, dw_part, rows, C, inv_c, eps);                                 \
  }                                                                                              \
  extern "C" __global__ void rmsnorm_dw_##S(const float* part, T* dw, int P, int C) {          \
    rmsnorm_dw<T>(part, dw, P, C);                                                               \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
