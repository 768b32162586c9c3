// linear_ce.cu: the two row-wise kernels of the fused linear cross-entropy; the matrix
// products (logits tile = H_r · W_vᵀ, dH_r += dL · W_v, dW_v += dLᵀ · H_r) run in cuBLAS
// through candle, one (rows × vocab) tile at a time, so the N × V logits never exist.
//   ce_tile_stats: per row of an (R, Vc) logits tile whose first column is vocab id v0:
//       out[r] = (max_j l, Σ_j exp(l − max), l[target − v0] if the target is in the tile else 0)
//     (the host folds tiles into the running log-sum-exp: the online softmax of flash attention)
//   ce_tile_grad: dL[r, j] = scale · (exp(l − lse[r]) − [v0 + j = target[r]])
// The per-token log-probabilities of GRPO (omr_kernels::linear_logp) score z = zscale · l +
// bias[v0 + j] (zscale = 1 / temperature; bias −1e30 on the vocab ids sampling never draws):
//   lp_tile_stats: out[r] = (max z, Σ exp(z − max), z[target] or 0, Σ exp(z − max) · z), the
//     last one for the entropy lse − Σ p z; one pass, online (max and sums rescaled together)
//   lp_tile_grad: dL[r, j] = g[r] · zscale · ([v0 + j = target[r]] − exp(z − lse[r])), the
//     gradient of logp[r] = z[target] − lse times the incoming g[r] (recomputed in the backward:
//     g differs per row, so dW cannot be formed in the forward as the scalar loss's is)
// Choices: one warp per row (rows are long: Vc is thousands), f32 arithmetic whatever the
// logits dtype, expf (not __expf: the log-sum-exp is the loss itself), dL written in the
// logits dtype so the next products stay in bf16 on tensor cores.
#include "common.cuh"

template <typename T>
__device__ void ce_tile_stats(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                              float* __restrict__ out, int R, int Vc, int v0) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < R; r += gridDim.x * warps) {
    const T* l = logits + (size_t)r * Vc;
    float m = -INFINITY;
    for (int j = lane; j < Vc; j += 32) m = fmaxf(m, to_f(l[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < Vc; j += 32) s += expf(to_f(l[j]) - m);
    s = warp_sum(s);
    if (lane == 0) {
      const long t = (long)tgt[r] - v0;
      out[3 * r] = m;
      out[3 * r + 1] = s;
      out[3 * r + 2] = (t >= 0 && t < Vc) ? to_f(l[t]) : 0.f;
    }
  }
}

template <typename T>
__device__ void ce_tile_grad(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                             const float* __restrict__ lse, T* __restrict__ dl, int R, int Vc,
                             int v0, float scale) {
  const long n = (long)R * Vc;
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int r = (int)(i / Vc), j = (int)(i - (long)r * Vc);
    const float p = expf(to_f(logits[i]) - lse[r]);
    const float y = ((long)tgt[r] == (long)v0 + j) ? 1.f : 0.f;
    dl[i] = from_f<T>(scale * (p - y));
  }
}

template <typename T>
__device__ void lp_tile_stats(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                              const float* __restrict__ bias, float* __restrict__ out, int R,
                              int Vc, int v0, float zscale) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < R; r += gridDim.x * warps) {
    const T* l = logits + (size_t)r * Vc;
    // Per lane: running max m, Σ exp(z − m) and Σ exp(z − m) · z over its columns.
    float m = -INFINITY, s = 0.f, u = 0.f;
    for (int j = lane; j < Vc; j += 32) {
      const float z = zscale * to_f(l[j]) + bias[v0 + j];
      if (z > m) {
        const float c = expf(m - z);  // 0 on the first column (m = −inf)
        s = s * c + 1.f;
        u = u * c + z;
        m = z;
      } else {
        const float e = expf(z - m);
        s += e;
        u += e * z;
      }
    }
    const float mx = warp_max(m);
    // A lane without columns (Vc < 32) has m = −inf and contributes nothing.
    const float c = m == -INFINITY ? 0.f : expf(m - mx);
    s = warp_sum(s * c);
    u = warp_sum(u * c);
    if (lane == 0) {
      const long t = (long)tgt[r] - v0;
      float* o = out + 4 * (size_t)r;
      o[0] = mx;
      o[1] = s;
      o[2] = (t >= 0 && t < Vc) ? zscale * to_f(l[t]) + bias[v0 + t] : 0.f;
      o[3] = u;
    }
  }
}

template <typename T>
__device__ void lp_tile_grad(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                             const float* __restrict__ bias, const float* __restrict__ lse,
                             const float* __restrict__ g, T* __restrict__ dl, int R, int Vc,
                             int v0, float zscale) {
  const long n = (long)R * Vc;
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int r = (int)(i / Vc), j = (int)(i - (long)r * Vc);
    const float z = zscale * to_f(logits[i]) + bias[v0 + j];
    const float p = expf(z - lse[r]);
    const float y = ((long)tgt[r] == (long)v0 + j) ? 1.f : 0.f;
    dl[i] = from_f<T>(g[r] * zscale * (y - p));
  }
}

#define ENTRIES(T, S)                                                                          \
  extern "C" __global__ void ce_tile_stats_##S(const T* l, const unsigned* t, float* out,     \
                                               int R, int Vc, int v0) {                       \
    ce_tile_stats<T>(l, t, out, R, Vc, v0);                                                   \
  }                                                                                            \
  extern "C" __global__ void ce_tile_grad_##S(const T* l, const unsigned* t, const float* lse, \
                                              T* dl, int R, int Vc, int v0, float scale) {     \
    ce_tile_grad<T>(l, t, lse, dl, R, Vc, v0, scale);                                          \
  }                                                                                            \
  extern "C" __global__ void lp_tile_stats_##S(const T* l, const unsigned* t, const float* b, \
                                               float* out, int R, int Vc, int v0, float zs) {  \
    lp_tile_stats<T>(l, t, b, out, R, Vc, v0, zs);                                            \
  }                                                                                            \
  extern "C" __global__ void lp_tile_grad_##S(const T* l, const unsigned* t, const float* b,  \
                                              const float* lse, const float* g, T* dl, int R,  \
                                              int Vc, int v0, float zs) {                      \
    lp_tile_grad<T>(l, t, b, lse, g, dl, R, Vc, v0, zs);                                      \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
