// adamw.cu: one AdamW step on fp32 master weights and moments, writing the new masters, the
// new moments and the bf16 compute copy in one pass (elementwise over one parameter of n).
//   gs = g·coef;  m' = β1·m + (1−β1)·gs;  v' = β2·v + (1−β2)·gs²;  p_d = p·(1 − lr·wd)
//   p' = p_d − (m' / (sqrt(v')·(1/sqrt(1−β2^t)) + eps)) · (lr / (1−β1^t));  p_bf16 = bf16(p')
// Choices: the same f32 operations, in the same order and with the same f32 constants (made
// on the host from f64, as candle's affine does) as omr-train's candle-op optimizer, each
// through a correctly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn) so nvcc
// contracts nothing into FMAs: the result is bit for bit the CPU reference's and the
// optimizer's. The `+ 0` of candle's affine is kept (it turns −0 into +0). Outputs are new
// buffers, or the inputs (the optimizer's in-place step); the bf16 copy is optional
// (has_pb); g may be f32 or bf16, or absent (has_g = 0: a zero gradient, the parameter had
// none this step).
#include "common.cuh"

// The outputs may be the inputs themselves (po = p, mo = m, vo = v: the optimizer's in-place
// step), hence no __restrict__ on them: each element is read, then written, by one thread.
template <typename G>
__device__ void adamw_step(const float* p, const float* m, const float* v,
                           const G* __restrict__ g, int has_g, float* po, float* mo, float* vo,
                           bf16* pb, int has_pb, long n, float coef, float b1, float omb1,
                           float b2, float omb2, float decay, float inv_b2, float eps,
                           float step) {
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gs = has_g ? __fadd_rn(__fmul_rn(to_f(g[i]), coef), 0.f) : 0.f;
    const float m1 = __fadd_rn(__fadd_rn(__fmul_rn(m[i], b1), 0.f),
                               __fadd_rn(__fmul_rn(gs, omb1), 0.f));
    const float v1 = __fadd_rn(__fadd_rn(__fmul_rn(v[i], b2), 0.f),
                               __fadd_rn(__fmul_rn(__fmul_rn(gs, gs), omb2), 0.f));
    const float pd = __fadd_rn(__fmul_rn(p[i], decay), 0.f);
    const float den = __fadd_rn(__fmul_rn(__fsqrt_rn(v1), inv_b2), eps);
    const float p1 = __fsub_rn(pd, __fadd_rn(__fmul_rn(__fdiv_rn(m1, den), step), 0.f));
    po[i] = p1;
    mo[i] = m1;
    vo[i] = v1;
    if (has_pb) pb[i] = __float2bfloat16_rn(p1);
  }
}

#define ENTRY(G, S)                                                                            \
  extern "C" __global__ void adamw_step_##S(                                                   \
      const float* p, const float* m, const float* v, const G* g, int has_g, float* po,        \
      float* mo, float* vo, bf16* pb, int has_pb, long n, float coef, float b1, float omb1,    \
      float b2, float omb2, float decay, float inv_b2, float eps, float step) {                \
    adamw_step<G>(p, m, v, g, has_g, po, mo, vo, pb, has_pb, n, coef, b1, omb1, b2, omb2,     \
                  decay, inv_b2, eps, step);                                                   \
  }
ENTRY(float, f32)
ENTRY(bf16, bf16)
