// sample_emu.cpp: kernels/sample.cu on the CPU (cuda_emu.h) against the reference it follows
// (omr_kernels::sample::gumbel_ref, written out again here): the Gumbel-max draw of each row
// must be the same token, and its log-probability within 1e-5 of log softmax in double
// precision. f32 and bf16 logits; rows longer and shorter than the block (3000, 100 and 1
// entries: threads without entries), suppressed ids, ties. Exits 1 on any failure. Built and
// run by run.sh.
#include "cuda_emu.h"
#include "../../../kernels/sample.cu"

#include <random>

namespace {

int failures = 0;

// The reference: online max / Σexp, strict > for the argmax (ties to the lowest id).
std::pair<unsigned, float> reference(const std::vector<float>& l, const std::vector<float>& b,
                                     unsigned long long key, float zs) {
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  size_t bi = 0;
  for (size_t j = 0; j < l.size(); j++) {
    const float z = zs * l[j] + b[j];
    if (z > m) {
      s = s * expf(m - z) + 1.f;
      m = z;
    } else {
      s += expf(z - m);
    }
    const float k = z + gumbel(key, j);
    if (k > best) best = k, bi = j;
  }
  return {(unsigned)bi, zs * l[bi] + b[bi] - (m + logf(s))};
}

template <typename T>
void run(const char* dt, int R, int V) {
  std::mt19937 rng(R * 7 + V);
  std::uniform_real_distribution<float> uni(-3.f, 3.f);
  std::vector<T> l(R * V);
  std::vector<float> lf(R * V);
  for (int i = 0; i < R * V; i++) {
    // Row 1 is constant: every entry ties before the noise.
    l[i] = T(i / V == 1 ? 0.5f : uni(rng));
    lf[i] = (float)l[i];
  }
  std::vector<float> bias(V, 0.f);
  for (int j = 0; j < V; j++)
    if (V > 1 && j % 7 == 2) bias[j] = -1e30f;
  std::vector<unsigned> keys(2 * R);
  for (int r = 0; r < R; r++) {
    const unsigned long long k = mix64(1234567ull + r);
    keys[2 * r] = (unsigned)(k >> 32), keys[2 * r + 1] = (unsigned)k;
  }
  const float zs = 1.f / 0.8f;
  std::vector<float> out(2 * R, NAN);
  const auto f = std::is_same_v<T, float>
                     ? (void (*)(const T*, const float*, const unsigned*, float*, int, float))gumbel_sample_f32
                     : (void (*)(const T*, const float*, const unsigned*, float*, int, float))gumbel_sample_bf16;
  emu_launch(f, Dim3{(unsigned)R, 1, 1}, SAMPLE_THREADS, 0, (const T*)l.data(),
             (const float*)bias.data(), (const unsigned*)keys.data(), out.data(), V, zs);
  for (int r = 0; r < R; r++) {
    std::vector<float> row(lf.begin() + r * V, lf.begin() + (r + 1) * V);
    const unsigned long long key = ((unsigned long long)keys[2 * r] << 32) | keys[2 * r + 1];
    const auto [t, lp] = reference(row, bias, key, zs);
    double m = -INFINITY, s = 0;
    for (int j = 0; j < V; j++)
      if (bias[j] == 0.f) m = std::max(m, (double)zs * row[j]);
    for (int j = 0; j < V; j++)
      if (bias[j] == 0.f) s += std::exp((double)zs * row[j] - m);
    const double want = (double)zs * row[t] - (m + std::log(s));
    const bool ok = out[2 * r] == (float)t && bias[t] == 0.f && std::fabs(out[2 * r + 1] - want) < 1e-5;
    if (!ok) failures++;
    std::printf("gumbel_sample %-4s V %5d row %d: token %6.0f (reference %6u), log-prob %.6f (%.6f) %s\n",
                dt, V, r, out[2 * r], t, out[2 * r + 1], want, ok ? "ok" : "FAILED");
  }
}

}  // namespace

int main() {
  for (int v : {3000, 100, 1}) {
    run<float>("f32", 4, v);
    run<bf16>("bf16", 4, v);
  }
  std::printf("sample %s: %d failure(s)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? 1 : 0;
}
