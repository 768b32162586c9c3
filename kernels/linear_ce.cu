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
// Layout: the statistics take one block per row (rows are long: Vc is thousands), each thread
// a column slice of 16-byte accesses (8 bf16 / 4 f32; one element when Vc or a pointer does
// not allow them), two in flight; every value is read once (one pass: online max and sums,
// rescaled together), and the threads' partial statistics are merged in a fixed order, so the
// result is the same on every run. The gradients take a 2-D grid: blockIdx.y walks the rows
// (row-constant lse, target, g read once), blockIdx.x · blockDim.x + threadIdx.x the 16-byte
// accesses of the row, two in flight. (Before: one warp per row with 2-byte loads read each
// row twice: 280 µs per 2048 × 32768 bf16 tile, ≈ 12% of an H200's bandwidth, in run 7's
// profile; the gradient divided a 64-bit index by Vc per element, 164 µs per tile.)
// Choices: f32 arithmetic whatever the logits dtype, expf (not __expf: the log-sum-exp is the
// loss itself), dL written in the logits dtype so the next products stay in bf16 on tensor
// cores.
#include "common.cuh"

// The running statistics of a set of columns: max m, Σ exp(z − m), Σ exp(z − m) · z (U: the
// last one is kept). m = −inf while the set is empty (s = u = 0 then).
template <bool U>
struct Online {
  float m = -INFINITY, s = 0.f, u = 0.f;

  // Adds N values: one rescale by their max, then their terms.
  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N]) {
    float cm = z[0];
#pragma unroll
    for (int e = 1; e < N; ++e) cm = fmaxf(cm, z[e]);
    if (cm > m) {
      const float c = expf(m - cm);  // 0 when the set was empty
      s *= c;
      if (U) u *= c;
      m = cm;
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float p = expf(z[e] - m);
      s += p;
      if (U) u += p * z[e];
    }
  }

  // Merges another set's statistics (either may be empty).
  __device__ __forceinline__ void merge(float m2, float s2, float u2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;
    const float c1 = m == -INFINITY ? 0.f : expf(m - mx);
    const float c2 = m2 == -INFINITY ? 0.f : expf(m2 - mx);
    s = s * c1 + s2 * c2;
    if (U) u = u * c1 + u2 * c2;
    m = mx;
  }

  // The block's statistics (blockDim.x a multiple of 32, at most 1024), in thread 0: lanes
  // merged by xor shuffles, then the warps in order. `sh`: 32 float3 of shared memory; the
  // leading barrier lets a caller reuse it row after row.
  __device__ __forceinline__ void block_merge(float3* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      const float u2 = U ? __shfl_xor_sync(0xffffffffu, u, o) : 0.f;
      merge(m2, s2, u2);
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = make_float3(m, s, u);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 1; w < (int)(blockDim.x >> 5); ++w) merge(sh[w].x, sh[w].y, sh[w].z);
  }
};

// z of N columns starting at column j (zscale · l + bias[v0 + j]; bias may be null: 0).
template <typename T, int N>
__device__ __forceinline__ void scores(const Pack<T, N>& p, const float* __restrict__ bias,
                                       int j, float zscale, float (&z)[N]) {
  p.unpack(z);
  if (bias) {
    float b[N];
    load_f32<N>(bias + j, b);
#pragma unroll
    for (int e = 0; e < N; ++e) z[e] = zscale * z[e] + b[e];
  }
}

// Per row r of (R, Vc): out[r · K ..] = (max z, Σ exp(z − max), z[target − v0] or 0, and with
// U Σ exp(z − max) · z). ce: bias null, zscale 1 (z = l exactly); lp: bias[v0 ..] and zscale.
template <typename T, int N, bool U>
__device__ void tile_stats(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                           const float* __restrict__ bias, float* __restrict__ out, int R, int Vc,
                           int v0, float zscale) {
  __shared__ float3 sh[32];
  constexpr int K = U ? 4 : 3;
  const int na = Vc / N, nt = blockDim.x;
  const float* bv = bias ? bias + v0 : nullptr;
  for (int r = blockIdx.x; r < R; r += gridDim.x) {
    const T* l = logits + (size_t)r * Vc;
    Online<U> st;
    for (int a = threadIdx.x; a < na; a += 2 * nt) {
      const int a2 = a + nt;
      Pack<T, N> p0, p1{};  // p1 read only when loaded
      p0.load(l + (size_t)a * N);
      if (a2 < na) p1.load(l + (size_t)a2 * N);
      float z[N];
      scores<T, N>(p0, bv, a * N, zscale, z);
      st.add(z);
      if (a2 < na) {
        scores<T, N>(p1, bv, a2 * N, zscale, z);
        st.add(z);
      }
    }
    st.block_merge(sh);
    if (threadIdx.x == 0) {
      const long t = (long)tgt[r] - v0;
      float* o = out + (size_t)K * r;
      o[0] = st.m;
      o[1] = st.s;
      o[2] = (t >= 0 && t < Vc) ? (bias ? zscale * to_f(l[t]) + bv[t] : to_f(l[t])) : 0.f;
      if (U) o[3] = st.u;
    }
  }
}

// Whether a tile can be walked in 16-byte accesses: every row of `logits` (and of the output
// tile `dl`, when there is one) starts 16-byte aligned, and the bias's slices (V f32 at column
// multiples of V from v0) are too, which needs v0 % 4 == 0 and an aligned bias.
template <typename T>
__device__ __forceinline__ bool vec_tile(const T* logits, const T* dl, const float* bias, int Vc,
                                         int v0) {
  return Vc % Vec16<T>::n == 0 && aligned16(logits) && (!dl || aligned16(dl)) &&
         (!bias || (v0 % 4 == 0 && aligned16(bias)));
}

template <typename T, bool U>
__device__ void tile_stats_any(const T* logits, const unsigned* tgt, const float* bias,
                               float* out, int R, int Vc, int v0, float zscale) {
  constexpr int V = Vec16<T>::n;
  if (vec_tile<T>(logits, nullptr, bias, Vc, v0))
    tile_stats<T, V, U>(logits, tgt, bias, out, R, Vc, v0, zscale);
  else
    tile_stats<T, 1, U>(logits, tgt, bias, out, R, Vc, v0, zscale);
}

// dl[r, j] = k_r · (exp(z − lse[r]) − [v0 + j = target[r]]), z = zscale · l + bias[v0 + j]
// (bias null: z = l), k_r = scale · (g ? g[r] : 1).
template <typename T, int N>
__device__ void tile_grad(const T* __restrict__ logits, const unsigned* __restrict__ tgt,
                          const float* __restrict__ bias, const float* __restrict__ lse,
                          const float* __restrict__ g, T* __restrict__ dl, int R, int Vc, int v0,
                          float zscale, float scale) {
  const int na = Vc / N, step = gridDim.x * blockDim.x;
  const float* bv = bias ? bias + v0 : nullptr;
  for (int r = blockIdx.y; r < R; r += gridDim.y) {
    const T* l = logits + (size_t)r * Vc;
    T* d = dl + (size_t)r * Vc;
    const float z0 = lse[r], k = g ? scale * g[r] : scale;
    const long t = (long)tgt[r] - v0;
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < na; a += 2 * step) {
      const int a2 = a + step;
      Pack<T, N> p0, p1{};  // p1 read only when loaded
      p0.load(l + (size_t)a * N);
      if (a2 < na) p1.load(l + (size_t)a2 * N);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ah = h ? a2 : a;
        if (h && ah >= na) break;
        float z[N], o[N];
        scores<T, N>(h ? p1 : p0, bv, ah * N, zscale, z);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const float y = (long)ah * N + e == t ? 1.f : 0.f;
          o[e] = k * (expf(z[e] - z0) - y);
        }
        Pack<T, N>::store(d + (size_t)ah * N, o);
      }
    }
  }
}

template <typename T>
__device__ void tile_grad_any(const T* logits, const unsigned* tgt, const float* bias,
                              const float* lse, const float* g, T* dl, int R, int Vc, int v0,
                              float zscale, float scale) {
  constexpr int V = Vec16<T>::n;
  if (vec_tile<T>(logits, dl, bias, Vc, v0))
    tile_grad<T, V>(logits, tgt, bias, lse, g, dl, R, Vc, v0, zscale, scale);
  else
    tile_grad<T, 1>(logits, tgt, bias, lse, g, dl, R, Vc, v0, zscale, scale);
}

// Blocks of 256 threads (a multiple of 32, at most 1024): the statistics a 1-D grid over the
// rows, the gradients a 2-D grid (x: accesses of a row, y: rows).
#define ENTRIES(T, S)                                                                          \
  extern "C" __global__ void ce_tile_stats_##S(const T* l, const unsigned* t, float* out,     \
                                               int R, int Vc, int v0) {                       \
    tile_stats_any<T, false>(l, t, nullptr, out, R, Vc, v0, 1.f);                             \
  }                                                                                            \
  extern "C" __global__ void ce_tile_grad_##S(const T* l, const unsigned* t, const float* lse, \
                                              T* dl, int R, int Vc, int v0, float scale) {     \
    tile_grad_any<T>(l, t, nullptr, lse, nullptr, dl, R, Vc, v0, 1.f, scale);                 \
  }                                                                                            \
  extern "C" __global__ void lp_tile_stats_##S(const T* l, const unsigned* t, const float* b, \
                                               float* out, int R, int Vc, int v0, float zs) {  \
    tile_stats_any<T, true>(l, t, b, out, R, Vc, v0, zs);                                     \
  }                                                                                            \
  extern "C" __global__ void lp_tile_grad_##S(const T* l, const unsigned* t, const float* b,  \
                                              const float* lse, const float* g, T* dl, int R,  \
                                              int Vc, int v0, float zs) {                      \
    tile_grad_any<T>(l, t, b, lse, g, dl, R, Vc, v0, zs, -zs);                                \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
