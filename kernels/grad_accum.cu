// grad_accum.cu: gradient accumulation over micro-batches, elementwise over one parameter of n:
//   out = f32(a) + f32(b)
// where a is the running sum (f32, or the first micro-batch's gradient as it came, bf16 on a
// compute copy) and b the next micro-batch's gradient (f32 or bf16). `out` may be `a` itself:
// the in-place add into an f32 sum, 10 bytes per element (12 with an f32 gradient) against the
// 18 of candle's cast, add and new sum. The casts are exact and the f32 addition is correctly
// rounded (__fadd_rn; nothing to contract), so the result is candle's
// `a.to_dtype(F32) + b.to_dtype(F32)` bit for bit.
// And a gradient scaled in place by a scalar that stays on the device (the fused linear
// cross-entropy's dH and dW times the loss's incoming gradient, without a host sync):
//   x = T(f32(x) · f32(T(s)))
// the scalar rounded to x's dtype first and one rounding of the product (exact in f32 for two
// bf16 values): candle's `x.broadcast_mul(&s.to_dtype(T))` bit for bit, in 16-byte accesses,
// two in flight per thread.
#include "common.cuh"

// `out` may alias `a` (no __restrict__ on either): each element is read, then written, by one
// thread.
template <typename A, typename B>
__device__ void grad_sum(const A* a, const B* __restrict__ b, float* out, long n) {
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __fadd_rn(to_f(a[i]), to_f(b[i]));
}

#define ENTRY(A, B, S)                                                                         \
  extern "C" __global__ void grad_sum_##S(const A* a, const B* b, float* out, long n) {        \
    grad_sum<A, B>(a, b, out, n);                                                              \
  }
ENTRY(float, float, f32_f32)
ENTRY(float, bf16, f32_bf16)
ENTRY(bf16, float, bf16_f32)
ENTRY(bf16, bf16, bf16_bf16)

template <typename T>
__device__ void grad_scale(T* x, const float* __restrict__ s, long n) {
  constexpr int N = Vec16<T>::n;
  const float k = round_as<T>(*s);
  const long tid = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const long stride = (long)gridDim.x * blockDim.x;
  const long nv = aligned16(x) ? n / N : 0;
  // Accesses i and i + stride of this thread, both loaded before either is used.
  for (long i = tid; i < nv; i += 2 * stride) {
    const long j = i + stride;
    const bool two = j < nv;
    Pack<T, N> pa, pb{};  // pb read only when loaded
    pa.load(x + i * N);
    if (two) pb.load(x + j * N);
    float f[N];
    pa.unpack(f);
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = __fmul_rn(f[e], k);
    Pack<T, N>::store(x + i * N, f);
    if (two) {
      pb.unpack(f);
#pragma unroll
      for (int e = 0; e < N; ++e) f[e] = __fmul_rn(f[e], k);
      Pack<T, N>::store(x + j * N, f);
    }
  }
  for (long i = nv * N + tid; i < n; i += stride) x[i] = from_f<T>(__fmul_rn(to_f(x[i]), k));
}

extern "C" __global__ void grad_scale_f32(float* x, const float* s, long n) {
  grad_scale<float>(x, s, n);
}
extern "C" __global__ void grad_scale_bf16(bf16* x, const float* s, long n) {
  grad_scale<bf16>(x, s, n);
}
