// swiglu.cu: the SwiGLU gate of the MLP, elementwise over (R, I) activations.
//   forward  y  = silu(g) · u,  silu(g) = g / (1 + exp(−g))
//   backward dg = dy · u · s · (1 + g · (1 − s)),  du = dy · silu(g),  s = sigmoid(g)
//   backward with the activation (`swiglu_bwd_act`): also y = silu(g) · u, written in the
//   same pass for a caller that did not keep the forward's y (the decoder MLP's down
//   projection needs it for its weight gradient; recomputing it here costs one more write
//   instead of keeping (R, I) alive from the forward to the backward).
// Choices: f32 arithmetic, one rounding per output (__expf: 2 ulp, far below bf16 rounding;
// the reciprocal correctly rounded, as 1/x); the backward recomputes s from g (nothing saved)
// and writes both gradients in one pass. Memory-bound: the arrays are walked in 16-byte
// accesses (8 bf16 / 4 f32 per access) by a grid-stride loop that loads two accesses per
// array before using either (more bytes in flight per thread); the last n mod 8 (4) elements,
// or all of them when some pointer is not 16-byte aligned, take the scalar loop.
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float g) { return __frcp_rn(1.f + __expf(-g)); }

template <int N> __device__ __forceinline__ void silu_mul(const float (&g)[N], const float (&u)[N],
                                                          float (&y)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) y[e] = g[e] * sigmoidf_(g[e]) * u[e];
}

// dg, du and (ACT) y = silu(g) · u, the forward's value from the same sigmoid.
template <bool ACT, int N>
__device__ __forceinline__ void swiglu_grad(const float (&g)[N], const float (&u)[N],
                                            const float (&d)[N], float (&dg)[N], float (&du)[N],
                                            float (&y)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float s = sigmoidf_(g[e]);
    dg[e] = d[e] * u[e] * s * (1.f + g[e] * (1.f - s));
    du[e] = d[e] * g[e] * s;
    if (ACT) y[e] = g[e] * s * u[e];
  }
}

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                           long n) {
  constexpr int N = Vec16<T>::n;
  const long tid = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const long stride = (long)gridDim.x * blockDim.x;
  const long nv = aligned16(g) && aligned16(u) && aligned16(y) ? n / N : 0;  // 16-byte accesses
  // Accesses i and i + stride of this thread: all four loads issued before any use.
  for (long i = tid; i < nv; i += 2 * stride) {
    const long j = i + stride;
    const bool two = j < nv;
    Pack<T, N> ga, ua, gb, ub;
    ga.load(g + i * N);
    ua.load(u + i * N);
    if (two) {
      gb.load(g + j * N);
      ub.load(u + j * N);
    }
    float gf[N], uf[N], yf[N];
    ga.unpack(gf);
    ua.unpack(uf);
    silu_mul(gf, uf, yf);
    Pack<T, N>::store(y + i * N, yf);
    if (two) {
      gb.unpack(gf);
      ub.unpack(uf);
      silu_mul(gf, uf, yf);
      Pack<T, N>::store(y + j * N, yf);
    }
  }
  for (long i = nv * N + tid; i < n; i += stride) {
    const float gf[1] = {to_f(g[i])}, uf[1] = {to_f(u[i])};
    float yf[1];
    silu_mul(gf, uf, yf);
    y[i] = from_f<T>(yf[0]);
  }
}

// ACT: also y = silu(g) · u into `y` (the forward's bits: silu_mul's expression).
template <typename T, bool ACT>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                           const T* __restrict__ dy, T* __restrict__ dg, T* __restrict__ du,
                           T* __restrict__ y, long n) {
  constexpr int N = Vec16<T>::n;
  const long tid = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const long stride = (long)gridDim.x * blockDim.x;
  const bool vec = aligned16(g) && aligned16(u) && aligned16(dy) && aligned16(dg) &&
                   aligned16(du) && (!ACT || aligned16(y));
  const long nv = vec ? n / N : 0;
  for (long i = tid; i < nv; i += 2 * stride) {
    const long j = i + stride;
    const bool two = j < nv;
    Pack<T, N> ga, ua, da, gb, ub, db;
    ga.load(g + i * N);
    ua.load(u + i * N);
    da.load(dy + i * N);
    if (two) {
      gb.load(g + j * N);
      ub.load(u + j * N);
      db.load(dy + j * N);
    }
    float gf[N], uf[N], df[N], dgf[N], duf[N], yf[N];
    ga.unpack(gf);
    ua.unpack(uf);
    da.unpack(df);
    swiglu_grad<ACT>(gf, uf, df, dgf, duf, yf);
    Pack<T, N>::store(dg + i * N, dgf);
    Pack<T, N>::store(du + i * N, duf);
    if (ACT) Pack<T, N>::store(y + i * N, yf);
    if (two) {
      gb.unpack(gf);
      ub.unpack(uf);
      db.unpack(df);
      swiglu_grad<ACT>(gf, uf, df, dgf, duf, yf);
      Pack<T, N>::store(dg + j * N, dgf);
      Pack<T, N>::store(du + j * N, duf);
      if (ACT) Pack<T, N>::store(y + j * N, yf);
    }
  }
  for (long i = nv * N + tid; i < n; i += stride) {
    const float gf[1] = {to_f(g[i])}, uf[1] = {to_f(u[i])}, df[1] = {to_f(dy[i])};
    float dgf[1], duf[1], yf[1];
    swiglu_grad<ACT>(gf, uf, df, dgf, duf, yf);
    dg[i] = from_f<T>(dgf[0]);
    du[i] = from_f<T>(duf[0]);
    if (ACT) y[i] = from_f<T>(yf[0]);
  }
}

#define ENTRIES(T, S)                                                                         \
  extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, long n) {          \
    swiglu_fwd<T>(g, u, y, n);                                                               \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* dg,      \
                                            T* du, long n) {                                 \
    swiglu_bwd<T, false>(g, u, dy, dg, du, nullptr, n);                                      \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_act_##S(const T* g, const T* u, const T* dy, T* dg,  \
                                                T* du, T* y, long n) {                       \
    swiglu_bwd<T, true>(g, u, dy, dg, du, y, n);                                             \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
