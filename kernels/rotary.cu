// rotary.cu: rotary position embedding applied to (B, T, H, D) queries or keys, with half
// tables cos/sin: (B, T, D/2) f32 that encode the positions. The same kernel serves the
// language model's M-RoPE (each frequency j reads the temporal, height or width position as
// mrope_section says; the tables are built on the host from the 3-D position ids) and the
// vision tower's 2-D rotary (first quarter of the head rotates with the patch row, second with
// its column), since both reduce to "frequency j of token (b, t) has angle θ[b, t, j]".
//   y[..., j]       = x[..., j] · c − x[..., j + D/2] · (σ s)
//   y[..., j + D/2] = x[..., j + D/2] · c + x[..., j] · (σ s),   σ = +1 forward, −1 backward
// (the backward is the inverse rotation). f32 arithmetic, one rounding per output; one block
// per token, threads over (head, j); the table row is read once per token for all heads.
#include "common.cuh"

template <typename T>
__device__ void rotary(const T* __restrict__ x, const float* __restrict__ cosv,
                       const float* __restrict__ sinv, T* __restrict__ y, int bt, int H, int D,
                       float sgn) {
  const int half = D / 2;
  for (int row = blockIdx.x; row < bt; row += gridDim.x) {
    const float* c = cosv + (size_t)row * half;
    const float* s = sinv + (size_t)row * half;
    const T* xr = x + (size_t)row * H * D;
    T* yr = y + (size_t)row * H * D;
    for (int k = threadIdx.x; k < H * half; k += blockDim.x) {
      const int h = k / half, j = k - h * half;
      const float x1 = to_f(xr[h * D + j]), x2 = to_f(xr[h * D + j + half]);
      const float cj = c[j], sj = sgn * s[j];
      yr[h * D + j] = from_f<T>(x1 * cj - x2 * sj);
      yr[h * D + j + half] = from_f<T>(x2 * cj + x1 * sj);
    }
  }
}

#define ENTRY(T, S)                                                                          \
  extern "C" __global__ void rotary_##S(const T* x, const float* c, const float* s, T* y,    \
                                        int bt, int H, int D, float sgn) {                   \
    rotary<T>(x, c, s, y, bt, H, D, sgn);                                                    \
  }
ENTRY(float, f32)
ENTRY(bf16, bf16)
