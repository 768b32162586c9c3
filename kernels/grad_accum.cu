// grad_accum.cu: gradient accumulation over micro-batches, elementwise over one parameter of n:
//   out = f32(a) + f32(b)
// where a is the running sum (f32, or the first micro-batch's gradient as it came, bf16 on a
// compute copy) and b the next micro-batch's gradient (f32 or bf16). `out` may be `a` itself:
// the in-place add into an f32 sum, 10 bytes per element (12 with an f32 gradient) against the
// 18 of candle's cast, add and new sum. The casts are exact and the f32 addition is correctly
// rounded (__fadd_rn; nothing to contract), so the result is candle's
// `a.to_dtype(F32) + b.to_dtype(F32)` bit for bit.
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
