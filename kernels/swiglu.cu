// swiglu.cu: the SwiGLU gate of the MLP, elementwise over (R, I) activations.
//   forward  y  = silu(g) · u,  silu(g) = g / (1 + exp(−g))
//   backward dg = dy · u · s · (1 + g · (1 − s)),  du = dy · silu(g),  s = sigmoid(g)
// Choices: f32 arithmetic, one rounding per output (__expf: 2 ulp, far below bf16 rounding);
// a plain grid-stride loop with scalar loads (vector loads are a measured-later step); the
// backward recomputes s from g (nothing saved) and writes both gradients in one pass.
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                           long n) {
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv * sigmoidf_(gv) * to_f(u[i]));
  }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                           const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                           long n) {
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gv = to_f(g[i]), uv = to_f(u[i]), d = to_f(dy[i]);
    const float s = sigmoidf_(gv);
    dg[i] = from_f<T>(d * uv * s * (1.f + gv * (1.f - s)));
    du[i] = from_f<T>(d * gv * s);
  }
}

#define ENTRIES(T, S)                                                                         \
  extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, long n) {          \
    swiglu_fwd<T>(g, u, y, n);                                                               \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* dg,      \
                                            T* du, long n) {                                 \
    swiglu_bwd<T>(g, u, dy, dg, du, n);                                                      \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
