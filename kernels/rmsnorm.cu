// rmsnorm.cu: Qwen2RMSNorm forward and backward, one row of C features per block iteration.
//   forward  y = round_T(x · r) · w,  r = 1 / sqrt(mean(x²) + eps)          x, y: (R, C), w: (C)
//   backward dx = r · (dn − n · mean(dn · n)),  dn = dy · w,  n = x · r
//            dw = Σ_rows dy · round_T(n)  (per-block partials, summed by the caller)
// Choices: f32 arithmetic whatever T is; the statistic r is recomputed in the backward (one more
// read of the row, which the backward reads anyway) instead of being saved; a grid-stride loop
// over rows with a fixed grid so dw partials need no atomics (deterministic); each thread owns
// the same columns in every row, so its dw accumulator in shared memory needs no barrier.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                            int rows, int C, float inv_c, float eps) {
  __shared__ float sh[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + (size_t)r * C;
    T* yr = y + (size_t)r * C;
    float ss = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float v = to_f(xr[c]);
      ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float rs = 1.f / sqrtf(ss * inv_c + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
      yr[c] = from_f<T>(round_as<T>(to_f(xr[c]) * rs) * to_f(w[c]));
  }
}

// dw_part: (gridDim.x, C) f32; dynamic shared memory: C floats.
template <typename T>
__device__ void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ w,
                            const T* __restrict__ dy, T* __restrict__ dx,
                            float* __restrict__ dw_part, int rows, int C, float inv_c, float eps) {
  extern __shared__ float acc[];
  __shared__ float sh[32];
  for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] = 0.f;
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + (size_t)r * C;
    const T* gr = dy + (size_t)r * C;
    T* dxr = dx + (size_t)r * C;
    float ss = 0.f, dot = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float v = to_f(xr[c]);
      ss += v * v;
      dot += to_f(gr[c]) * to_f(w[c]) * v;
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    const float rs = 1.f / sqrtf(ss * inv_c + eps);
    // mean(dn · n) = rs · Σ dn·x / C
    const float m = dot * rs * inv_c;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float g = to_f(gr[c]);
      const float n = to_f(xr[c]) * rs;
      dxr[c] = from_f<T>(rs * (g * to_f(w[c]) - n * m));
      acc[c] += g * round_as<T>(n);
    }
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) dw_part[(size_t)blockIdx.x * C + c] = acc[c];
}

#define ENTRIES(T, S)                                                                            \
  extern "C" __global__ void rmsnorm_fwd_##S(const T* x, const T* w, T* y, int rows, int C,     \
                                             float inv_c, float eps) {                          \
    rmsnorm_fwd<T>(x, w, y, rows, C, inv_c, eps);                                               \
  }                                                                                              \
  extern "C" __global__ void rmsnorm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,        \
                                             float* dw_part, int rows, int C, float inv_c,      \
                                             float eps) {                                        \
    rmsnorm_bwd<T>(x, w, dy, dx, dw_part, rows, C, inv_c, eps);                                 \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
