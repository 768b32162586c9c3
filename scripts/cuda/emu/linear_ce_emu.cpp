// linear_ce_emu.cpp: kernels/linear_ce.cu on the CPU (cuda_emu.h) against the definitions in
// double precision: the cross-entropy's tile statistics and gradient (ce_tile_*) and GRPO's
// log-probability tile statistics and gradient (lp_tile_*: the bias and the per-row
// gradient); both one-pass online max / sums merged across a block. f32 and bf16 logits, on
// the 16-byte path (Vc a multiple of 8 / 4, v0 a multiple of 4) and the one-element fallback
// (Vc 300 or 20 in bf16, v0 odd); a tile narrower than the block (threads without columns), a
// target outside the tile, rows beyond the grid (the grid-stride loops). And the loss's
// backward scale (grad_accum.cu's grad_scale, in place): candle's broadcast_mul bit for bit,
// on the 16-byte path and off it. Exits 1 on any failure. Built and run by run.sh.
#include "cuda_emu.h"
#include "../../../kernels/linear_ce.cu"
#include "../../../kernels/grad_accum.cu"

#include <random>

namespace {

int failures = 0;
int v0_now = 0;

void expect(const char* what, const char* dt, int vc, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) failures++;
  std::printf("%-22s %-4s Vc %5d v0 %4d: max rel err %.3e (tol %.0e) %s\n", what, dt, vc, v0_now,
              err, tol, ok ? "ok" : "FAILED");
}

double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double scale = 1e-30, worst = 0;
  for (double x : b) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < a.size(); i++) {
    const double d = std::fabs((double)a[i] - b[i]);
    if (!(d == d)) return INFINITY;
    worst = std::max(worst, d);
  }
  return worst / scale;
}

template <typename T>
void run(const char* dt, int R, int Vc, int v0, double tol) {
  v0_now = v0;
  std::mt19937 rng(R * 131 + Vc + v0);
  std::uniform_real_distribution<float> uni(-4.f, 4.f);
  const int V = v0 + Vc + 50;
  std::vector<T> l(R * Vc);
  std::vector<double> ld(R * Vc);
  for (int i = 0; i < R * Vc; i++) {
    l[i] = T(uni(rng));
    ld[i] = (double)(float)l[i];
  }
  std::vector<unsigned> tgt(R);
  // Every 5th row's target lies outside the tile (below v0 or past its end).
  for (int r = 0; r < R; r++) tgt[r] = r % 5 == 4 ? (r % 2 ? v0 + Vc + 3 : 0) : v0 + (r * 37) % Vc;
  // −1e30 on every 11th id that is nobody's target (the ids sampling suppresses).
  std::vector<float> bias(V, 0.f);
  for (int j = 0; j < V; j++)
    if (j % 11 == 3 && std::find(tgt.begin(), tgt.end(), (unsigned)j) == tgt.end()) bias[j] = -1e30f;
  std::vector<float> lse(R), g(R);
  for (int r = 0; r < R; r++) g[r] = uni(rng) / 4;
  const float zs = 1.f / 0.7f;

  // lp_tile_stats: (max z, Σ exp(z − max), z[target] or 0, Σ exp(z − max) z).
  std::vector<double> want(4 * R);
  for (int r = 0; r < R; r++) {
    double m = -INFINITY, s = 0, u = 0, t = 0;
    auto z = [&](int j) { return (double)zs * ld[r * Vc + j] + bias[v0 + j]; };
    for (int j = 0; j < Vc; j++) m = std::max(m, z(j));
    for (int j = 0; j < Vc; j++) {
      s += std::exp(z(j) - m);
      u += std::exp(z(j) - m) * z(j);
    }
    const long tt = (long)tgt[r] - v0;
    if (tt >= 0 && tt < Vc) t = z((int)tt);
    want[4 * r] = m, want[4 * r + 1] = s, want[4 * r + 2] = t, want[4 * r + 3] = u;
    lse[r] = (float)(m + std::log(s));
  }
  std::vector<float> out(4 * R, NAN);
  // 2 CTAs of 8 warps for R rows: the grid-stride loop covers the rest.
  const auto stats = std::is_same_v<T, float> ? (void (*)(const T*, const unsigned*, const float*, float*, int, int, int, float))lp_tile_stats_f32
                                              : (void (*)(const T*, const unsigned*, const float*, float*, int, int, int, float))lp_tile_stats_bf16;
  emu_launch(stats, Dim3{2, 1, 1}, 256, 0, (const T*)l.data(), (const unsigned*)tgt.data(),
             (const float*)bias.data(), out.data(), R, Vc, v0, zs);
  // The max and target score exactly; the sums to f32 accumulation order. Σ exp · z cancels
  // (positive and negative scores), so its error is taken against Σ exp · |z|.
  std::vector<float> got[4];
  std::vector<double> ref[4];
  for (int r = 0; r < R; r++)
    for (int k = 0; k < 4; k++) got[k].push_back(out[4 * r + k]), ref[k].push_back(want[4 * r + k]);
  expect("lp_tile_stats max", dt, Vc, rel(got[0], ref[0]), 1e-7);
  expect("lp_tile_stats sum", dt, Vc, rel(got[1], ref[1]), 1e-5);
  expect("lp_tile_stats target", dt, Vc, rel(got[2], ref[2]), 1e-7);
  expect("lp_tile_stats sum z", dt, Vc, rel(got[3], ref[3]), 1e-5);

  // lp_tile_grad: g · zs · (onehot − exp(z − lse)), stored as T.
  std::vector<double> gw(R * Vc);
  for (int r = 0; r < R; r++)
    for (int j = 0; j < Vc; j++) {
      const double z = (double)zs * ld[r * Vc + j] + bias[v0 + j];
      const double y = (long)tgt[r] == (long)v0 + j ? 1 : 0;
      gw[r * Vc + j] = (double)g[r] * zs * (y - std::exp(z - lse[r]));
    }
  std::vector<T> dl(R * Vc);
  const auto grad = std::is_same_v<T, float> ? (void (*)(const T*, const unsigned*, const float*, const float*, const float*, T*, int, int, int, float))lp_tile_grad_f32
                                             : (void (*)(const T*, const unsigned*, const float*, const float*, const float*, T*, int, int, int, float))lp_tile_grad_bf16;
  // 2 × 5 CTAs of 64 threads: the accesses of a row over two CTAs, the rows over five.
  emu_launch(grad, Dim3{2, 5, 1}, 64, 0, (const T*)l.data(), (const unsigned*)tgt.data(),
             (const float*)bias.data(), (const float*)lse.data(), (const float*)g.data(), dl.data(), R, Vc, v0, zs);
  std::vector<float> dlf(R * Vc);
  for (int i = 0; i < R * Vc; i++) dlf[i] = (float)dl[i];
  expect("lp_tile_grad", dt, Vc, rel(dlf, gw), std::is_same_v<T, float> ? 1e-5 : 8e-3);

  // ce_tile_stats / ce_tile_grad (zscale 1, no bias): the cross-entropy's pair.
  std::vector<float> ce(3 * R, NAN);
  const auto cstats = std::is_same_v<T, float> ? (void (*)(const T*, const unsigned*, float*, int, int, int))ce_tile_stats_f32
                                               : (void (*)(const T*, const unsigned*, float*, int, int, int))ce_tile_stats_bf16;
  emu_launch(cstats, Dim3{2, 1, 1}, 256, 0, (const T*)l.data(), (const unsigned*)tgt.data(), ce.data(), R, Vc, v0);
  std::vector<float> cg[3];
  std::vector<double> cr[3];
  for (int r = 0; r < R; r++) {
    double m = -INFINITY, s = 0, t = 0;
    for (int j = 0; j < Vc; j++) m = std::max(m, ld[r * Vc + j]);
    for (int j = 0; j < Vc; j++) s += std::exp(ld[r * Vc + j] - m);
    const long tt = (long)tgt[r] - v0;
    if (tt >= 0 && tt < Vc) t = ld[r * Vc + tt];
    const double w3[3] = {m, s, t};
    for (int k = 0; k < 3; k++) cg[k].push_back(ce[3 * r + k]), cr[k].push_back(w3[k]);
  }
  expect("ce_tile_stats max", dt, Vc, rel(cg[0], cr[0]), 1e-7);
  expect("ce_tile_stats sum", dt, Vc, rel(cg[1], cr[1]), 1e-5);
  expect("ce_tile_stats target", dt, Vc, rel(cg[2], cr[2]), 1e-7);

  // ce_tile_grad: scale · (exp(l − lse) − onehot), stored as T.
  const float cscale = 0.37f;
  std::vector<float> clse(R);
  std::vector<double> cgw(R * Vc);
  for (int r = 0; r < R; r++) {
    clse[r] = (float)(cr[0][r] + std::log(cr[1][r]));
    for (int j = 0; j < Vc; j++) {
      const double y = (long)tgt[r] == (long)v0 + j ? 1 : 0;
      cgw[r * Vc + j] = (double)cscale * (std::exp(ld[r * Vc + j] - clse[r]) - y);
    }
  }
  std::vector<T> cdl(R * Vc);
  const auto cgrad = std::is_same_v<T, float> ? (void (*)(const T*, const unsigned*, const float*, T*, int, int, int, float))ce_tile_grad_f32
                                              : (void (*)(const T*, const unsigned*, const float*, T*, int, int, int, float))ce_tile_grad_bf16;
  emu_launch(cgrad, Dim3{3, 4, 1}, 32, 0, (const T*)l.data(), (const unsigned*)tgt.data(),
             (const float*)clse.data(), cdl.data(), R, Vc, v0, cscale);
  std::vector<float> cdlf(R * Vc);
  for (int i = 0; i < R * Vc; i++) cdlf[i] = (float)cdl[i];
  expect("ce_tile_grad", dt, Vc, rel(cdlf, cgw), std::is_same_v<T, float> ? 1e-5 : 8e-3);
}

// grad_scale: x = T(f32(x) · f32(T(s))), in place, against the same formula on the host (the
// rounding candle's bf16 / f32 multiplication makes); `off` 1 misaligns x (one-element path).
template <typename T>
void scale_case(const char* dt, int n, int off) {
  std::mt19937 rng(n + off);
  std::uniform_real_distribution<float> uni(-3.f, 3.f);
  std::vector<T> buf(n + 8), want(n + 8);
  for (auto& v : buf) v = T(uni(rng));
  const float s = 0.37f, k = (float)T(s);
  for (int i = 0; i < n + 8; i++) want[i] = i >= off && i < off + n ? T((float)buf[i] * k) : buf[i];
  const auto f = std::is_same_v<T, float> ? (void (*)(T*, const float*, long))grad_scale_f32
                                          : (void (*)(T*, const float*, long))grad_scale_bf16;
  emu_launch(f, Dim3{2, 1, 1}, 64, 0, buf.data() + off, &s, (long)n);
  int bad = 0;
  for (int i = 0; i < n + 8; i++) bad += std::memcmp(&buf[i], &want[i], sizeof(T)) != 0;
  if (bad) failures++;
  std::printf("grad_scale %-4s n %5d offset %d: %d element(s) differ %s\n", dt, n, off, bad,
              bad ? "FAILED" : "ok");
}

}  // namespace

int main() {
  // 2 CTAs of 64 threads over 1003 / 4096 elements: several accesses per thread, a tail.
  for (int n : {1003, 4096})
    for (int off : {0, 1}) {
      scale_case<float>("f32", n, off);
      scale_case<bf16>("bf16", n, off);
    }
  // R 37 rows on 2 CTAs (grid stride); Vc 300 (every thread has columns), 20 (most have
  // none), 2000 (long rows: the online rescaling many times per thread); v0 1000 (the bias
  // read 16 bytes at a time) and 1001 (one element at a time).
  for (int v0 : {1000, 1001})
    for (int vc : {300, 20, 2000}) {
      run<float>("f32", 37, vc, v0, 1e-5);
      run<bf16>("bf16", 37, vc, v0, 1e-5);
    }
  std::printf("linear_ce %s: %d failure(s)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? 1 : 0;
}
