// sample.cu: one token per row of a logits matrix, drawn on the device, so generation reads
// back 8 bytes a row instead of the row (Qwen's 152k-entry vocabulary: 600 KB a row, 78 MB a
// step of 128 rows) and samples it on the host.
//   gumbel_sample: for row r, z_j = zscale · l_j + bias_j (zscale = 1 / temperature, bias −1e30
//     on the ids never drawn), g_j = −log(−log(u_j)) with u_j uniform in (0, 1) from a counter
//     hash of (key_r, j); the token is argmax_j (z_j + g_j) (the Gumbel-max trick: exactly a
//     draw from softmax(z)), ties to the lowest id; out[r] = (token as float, z_token − lse(z)).
// The hash (splitmix64's finaliser on key ^ mix(j)) and the order of everything are those of
// the CPU reference (`omr_kernels::sample::gumbel_ref`), so both draw the same tokens up to
// the last bit of their logf. One block per row; online max / Σexp per thread, merged in a
// fixed tree over shared memory, so a row gives the same bits on every run.
#include "common.cuh"

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// u in (0, 1): the hash's top 24 bits, centred in their cell; then −log(−log(u)).
__device__ __forceinline__ float gumbel(unsigned long long key, unsigned long long j) {
  const unsigned long long h = mix64(key ^ mix64(j));
  const float u = ((float)(h >> 40) + 0.5f) * 5.9604644775390625e-8f;
  return -logf(-logf(u));
}

constexpr int SAMPLE_THREADS = 256;

template <typename T>
__device__ void gumbel_sample(const T* __restrict__ logits, const float* __restrict__ bias,
                              const unsigned* __restrict__ keys, float* __restrict__ out, int V,
                              float zscale) {
  __shared__ float sm[SAMPLE_THREADS], ss[SAMPLE_THREADS], sb[SAMPLE_THREADS];
  __shared__ int si[SAMPLE_THREADS];
  const int r = blockIdx.x, tid = threadIdx.x;
  const T* l = logits + (size_t)r * V;
  const unsigned long long key =
      ((unsigned long long)keys[2 * r] << 32) | (unsigned long long)keys[2 * r + 1];
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  int bi = V;  // no token yet: loses every comparison
  for (int j = tid; j < V; j += SAMPLE_THREADS) {
    const float z = zscale * to_f(l[j]) + bias[j];
    if (z > m) {
      s = s * expf(m - z) + 1.f;
      m = z;
    } else {
      s += expf(z - m);
    }
    const float k = z + gumbel(key, (unsigned long long)j);
    if (k > best) {  // j grows within a thread: strict keeps the lowest id of a tie
      best = k;
      bi = j;
    }
  }
  sm[tid] = m, ss[tid] = s, sb[tid] = best, si[tid] = bi;
  __syncthreads();
  for (int w = SAMPLE_THREADS / 2; w > 0; w >>= 1) {
    if (tid < w) {
      const float ma = sm[tid], mb = sm[tid + w];
      const float mx = fmaxf(ma, mb);
      const float ca = ma == -INFINITY ? 0.f : expf(ma - mx);
      const float cb = mb == -INFINITY ? 0.f : expf(mb - mx);
      sm[tid] = mx;
      ss[tid] = ss[tid] * ca + ss[tid + w] * cb;
      const float bb = sb[tid + w];
      const int ib = si[tid + w];
      if (bb > sb[tid] || (bb == sb[tid] && ib < si[tid])) {
        sb[tid] = bb;
        si[tid] = ib;
      }
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int t = si[0];
    const float zt = zscale * to_f(l[t]) + bias[t];
    out[2 * r] = (float)t;
    out[2 * r + 1] = zt - (sm[0] + logf(ss[0]));
  }
}

#define ENTRIES(T, S)                                                                          \
  extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                 \
      gumbel_sample_##S(const T* l, const float* b, const unsigned* k, float* out, int V,     \
                        float zs) {                                                            \
    gumbel_sample<T>(l, b, k, out, V, zs);                                                    \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
