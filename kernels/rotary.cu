// rotary.cu: rotary position embedding applied to (B, T, H, D) queries or keys, with half
// tables cos/sin: (B, T, D/2) f32 that encode the positions. The same kernel serves the
// language model's M-RoPE (each frequency j reads the temporal, height or width position as
// mrope_section says; the tables are built on the host from the 3-D position ids) and the
// vision tower's 2-D rotary (first quarter of the head rotates with the patch row, second with
// its column), since both reduce to "frequency j of token (b, t) has angle θ[b, t, j]".
//   y[..., j]       = x[..., j] · c − x[..., j + D/2] · (σ s)
//   y[..., j + D/2] = x[..., j + D/2] · c + x[..., j] · (σ s),   σ = +1 forward, −1 backward
// (the backward is the inverse rotation). f32 arithmetic, one rounding per output. Memory-
// bound: one work item is N consecutive frequencies j0 … j0 + N − 1 of one head of one token,
// read and written as 16-byte accesses at j0 and j0 + D/2 (N = 8 bf16 / 4 f32) when D/2 is a
// multiple of N and x, y, cos, sin are 16-byte aligned, else N = 1; items are numbered token-
// major over a flat grid-stride loop (no idle threads whatever H and D), so a warp's items
// share one or two tokens and their table rows come from L1.
#include "common.cuh"

template <typename T, int N>
__device__ void rotary_items(const T* __restrict__ x, const float* __restrict__ cosv,
                             const float* __restrict__ sinv, T* __restrict__ y, int bt, int H,
                             int D, float sgn) {
  const int half = D / 2;
  const unsigned per_head = half / N, per_row = H * per_head;  // items
  const long total = (long)bt * per_row;  // < 2^31: x has fewer than 2^31 elements
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const unsigned q = (unsigned)i;
    const unsigned row = q / per_row, rem = q - row * per_row;
    const unsigned h = rem / per_head, j0 = (rem - h * per_head) * N;
    const size_t xo = (size_t)row * H * D + (size_t)h * D + j0;  // element of x[row, h, j0]
    Pack<T, N> p1, p2;
    p1.load(x + xo);
    p2.load(x + xo + half);
    float c[N], s[N];
    load_f32(cosv + (size_t)row * half + j0, c);
    load_f32(sinv + (size_t)row * half + j0, s);
    float x1[N], x2[N], y1[N], y2[N];
    p1.unpack(x1);
    p2.unpack(x2);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float sj = sgn * s[e];
      y1[e] = x1[e] * c[e] - x2[e] * sj;
      y2[e] = x2[e] * c[e] + x1[e] * sj;
    }
    Pack<T, N>::store(y + xo, y1);
    Pack<T, N>::store(y + xo + half, y2);
  }
}

template <typename T>
__device__ void rotary(const T* x, const float* cosv, const float* sinv, T* y, int bt, int H,
                       int D, float sgn) {
  constexpr int V = Vec16<T>::n;
  if ((D / 2) % V == 0 && aligned16(x) && aligned16(y) && aligned16(cosv) && aligned16(sinv))
    rotary_items<T, V>(x, cosv, sinv, y, bt, H, D, sgn);
  else
    rotary_items<T, 1>(x, cosv, sinv, y, bt, H, D, sgn);
}

#define ENTRY(T, S)                                                                          \
  extern "C" __global__ void rotary_##S(const T* x, const float* c, const float* s, T* y,    \
                                        int bt, int H, int D, float sgn) {                   \
    rotary<T>(x, c, s, y, bt, H, D, sgn);                                                    \
  }
ENTRY(float, f32)
ENTRY(bf16, bf16)
