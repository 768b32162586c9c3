// memory_emu.cpp: the memory-bound kernels on the CPU (cuda_emu.h) against their references,
// launched with the shapes their Rust launchers use (each formula written out again here):
//   - swiglu.cu: forward, backward, backward with the activation (`swiglu_bwd_act`, which
//     must give the backward's dg / du and the forward's y bit for bit);
//   - rmsnorm.cu: forward, backward (its one wave of resident blocks: 1, 3 or every row
//     group's block) and rmsnorm_dw's sum of the blocks' partial rows;
//   - rotary.cu: the rotation and its inverse (the same float expressions: bit for bit);
//   - grad_accum.cu: grad_sum of each dtype pair (in place too) and grad_scale, bit for bit;
//   - adamw.cu: the AdamW step (correctly rounded intrinsics throughout: bit for bit), with
//     and without a gradient and a bf16 copy;
//   - grad_norm.cu: the chunked sum of squares over several tensors and its finish;
//   - attn_softmax.cu: attn_delta (Δ of every tensor-core attention backward) and the GEMM
//     attention's masked softmax forward and backward on a block of rows and keys.
// Each on the 16-byte path and the fallback (sizes that are not multiples of an access,
// pointers one element off 16-byte alignment), f32 and bf16, with grids small enough that the
// grid-stride loops take several steps. Outputs start as NaN, so an element no thread writes
// shows. Exits 1 on any failure. Built and run by run.sh.
#include "cuda_emu.h"

#include "../../../kernels/swiglu.cu"
#undef ENTRIES
#include "../../../kernels/rmsnorm.cu"
#undef ENTRIES
#include "../../../kernels/rotary.cu"
#undef ENTRY
#include "../../../kernels/grad_accum.cu"
#undef ENTRY
#include "../../../kernels/adamw.cu"
#undef ENTRY
#include "../../../kernels/grad_norm.cu"
#undef ENTRIES
#include "../../../kernels/attn_softmax.cu"

#include <functional>
#include <random>
#include <string>
#include <type_traits>

namespace {

int failures = 0;

template <typename T>
float f(T v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return __bfloat162float(v);
}

template <typename T>
T t_of(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return __float2bfloat16_rn(v);
}

template <typename T>
const char* name() {
  return std::is_same_v<T, float> ? "f32" : "bf16";
}

template <typename T>
constexpr int vec() {
  return 16 / (int)sizeof(T);
}

// n values of T in [−a, a], in a buffer whose first element is `off` elements past a 16-byte
// boundary (the vector holds `off` more; `at` gives the data).
template <typename T>
struct Buf {
  std::vector<T> v;
  int off;
  Buf(size_t n, int off_) : v(n + 8), off(off_) {
    if ((reinterpret_cast<uintptr_t>(v.data()) & 15) != 0) emu::fail("vector not 16-byte aligned", 0, 0);
    for (auto& x : v) x = t_of<T>(NAN);
  }
  // Copies keep their vector's alignment in practice (malloc's 16 bytes); checked here, so
  // the 16-byte paths do run where a test means them to.
  T* at() {
    if (off == 0 && (reinterpret_cast<uintptr_t>(v.data()) & 15) != 0) emu::fail("buffer not 16-byte aligned", 0, 0);
    return v.data() + off;
  }
  float get(size_t i) const { return f(v[off + i]); }
};

template <typename T>
Buf<T> random(size_t n, int off, float a, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-a, a);
  Buf<T> b(n, off);
  for (size_t i = 0; i < n; i++) b.at()[i] = t_of<T>(uni(rng));
  return b;
}

// got[i] against want[i]: within atol + rtol·|want|, never NaN (an element nobody wrote).
void check(const std::string& what, size_t n, const std::function<float(size_t)>& got,
           const std::function<double(size_t)>& want, double rtol, double atol) {
  size_t bad = 0, first = n;
  double worst = 0;
  for (size_t i = 0; i < n; i++) {
    const double g = got(i), w = want(i), e = std::fabs(g - w);
    const bool ok = !std::isnan(g) && e <= atol + rtol * std::fabs(w);
    if (!ok && bad++ == 0) first = i;
    if (!std::isnan(g)) worst = std::max(worst, e / (atol + rtol * std::fabs(w)));
  }
  if (bad) failures++;
  if (bad)
    std::printf("%-58s FAILED: %zu of %zu off (first at %zu: %g, want %g)\n", what.c_str(), bad, n,
                first, (double)got(first), want(first));
  else
    std::printf("%-58s ok (%zu values, worst %.2f of the tolerance)\n", what.c_str(), n, worst);
}

// Bit for bit (a NaN never matches).
void same(const std::string& what, size_t n, const std::function<float(size_t)>& got,
          const std::function<float(size_t)>& want) {
  size_t bad = 0;
  for (size_t i = 0; i < n; i++)
    if (__float_as_uint(got(i)) != __float_as_uint(want(i)) || std::isnan(got(i))) bad++;
  if (bad) failures++;
  std::printf("%-58s %s (%zu values)\n", what.c_str(), bad ? "FAILED" : "ok, bit for bit", n);
  if (bad) std::printf("  %zu differ\n", bad);
}

// cuda::vec16_blocks.
template <typename T>
unsigned vec16_blocks(size_t n) {
  return (unsigned)std::clamp<size_t>((n + 256 * 2 * vec<T>() - 1) / (256 * 2 * vec<T>()), 1, 1 << 20);
}

// ---- swiglu.cu --------------------------------------------------------------------------

template <typename T>
void swiglu(size_t n, int off, bool one_block) {
  auto g = random<T>(n, off, 4.f, 1 + (unsigned)n), u = random<T>(n, off, 2.f, 2 + (unsigned)n),
       dy = random<T>(n, off, 1.f, 3 + (unsigned)n);
  Buf<T> y(n, off), dg(n, off), du(n, off), dg2(n, off), du2(n, off), y2(n, off);
  const unsigned blocks = one_block ? 1 : vec16_blocks<T>(n);
  const Dim3 grid{blocks, 1, 1};
  if constexpr (std::is_same_v<T, float>) {
    emu_launch(swiglu_fwd_f32, grid, 256, 0, (const T*)g.at(), (const T*)u.at(), y.at(), (long)n);
    emu_launch(swiglu_bwd_f32, grid, 256, 0, (const T*)g.at(), (const T*)u.at(), (const T*)dy.at(),
               dg.at(), du.at(), (long)n);
    emu_launch(swiglu_bwd_act_f32, grid, 256, 0, (const T*)g.at(), (const T*)u.at(),
               (const T*)dy.at(), dg2.at(), du2.at(), y2.at(), (long)n);
  } else {
    emu_launch(swiglu_fwd_bf16, grid, 256, 0, (const T*)g.at(), (const T*)u.at(), y.at(), (long)n);
    emu_launch(swiglu_bwd_bf16, grid, 256, 0, (const T*)g.at(), (const T*)u.at(), (const T*)dy.at(),
               dg.at(), du.at(), (long)n);
    emu_launch(swiglu_bwd_act_bf16, grid, 256, 0, (const T*)g.at(), (const T*)u.at(),
               (const T*)dy.at(), dg2.at(), du2.at(), y2.at(), (long)n);
  }
  const double rtol = std::is_same_v<T, float> ? 1e-5 : 1.0 / 128, atol = 1e-6;
  const std::string at = std::string(" ") + name<T>() + " n " + std::to_string(n) + " off " +
                         std::to_string(off) + " grid " + std::to_string(blocks);
  auto s = [&](size_t i) { return 1.0 / (1.0 + std::exp(-(double)g.get(i))); };
  check("swiglu_fwd" + at, n, [&](size_t i) { return y.get(i); },
        [&](size_t i) { return g.get(i) * s(i) * u.get(i); }, rtol, atol);
  check("swiglu_bwd dg" + at, n, [&](size_t i) { return dg.get(i); },
        [&](size_t i) { return dy.get(i) * u.get(i) * s(i) * (1 + g.get(i) * (1 - s(i))); }, rtol, atol);
  check("swiglu_bwd du" + at, n, [&](size_t i) { return du.get(i); },
        [&](size_t i) { return dy.get(i) * g.get(i) * s(i); }, rtol, atol);
  same("swiglu_bwd_act dg = swiglu_bwd's" + at, n, [&](size_t i) { return dg2.get(i); },
       [&](size_t i) { return dg.get(i); });
  same("swiglu_bwd_act du = swiglu_bwd's" + at, n, [&](size_t i) { return du2.get(i); },
       [&](size_t i) { return du.get(i); });
  same("swiglu_bwd_act y = swiglu_fwd's" + at, n, [&](size_t i) { return y2.get(i); },
       [&](size_t i) { return y.get(i); });
}

// ---- rmsnorm.cu -------------------------------------------------------------------------

// rmsnorm.rs: row_layout, bwd_groups, FWD_VEC, bwd_cols_per_thread.
std::pair<int, int> row_layout(int c, int per_thread, int block) {
  int tpr = (c + per_thread - 1) / per_thread;
  tpr = std::clamp((tpr + 31) / 32 * 32, 32, 1024);
  return {tpr, std::max(block / tpr, 1)};
}
int bwd_groups(int c, int tpr) { return std::max(std::min(512 / tpr, 12 * 1024 / std::max(c, 1)), 1); }

template <typename T>
void rmsnorm(int rows, int C, int off, int resident) {
  const float eps = 1e-6f, inv_c = (float)(1.0 / C);
  const size_t n = (size_t)rows * C;
  auto x = random<T>(n, off, 2.f, 11 + C), dy = random<T>(n, off, 1.f, 12 + C);
  auto w = random<T>(C, off, 1.f, 13 + C);
  for (int c = 0; c < C; c++) w.at()[c] = t_of<T>(1.f + 0.5f * f(w.at()[c]));
  Buf<T> y(n, off), dx(n, off), dw(C, off);
  const auto [tpr, groups] = row_layout(C, 4 * vec<T>(), 128);
  const unsigned fblocks = (unsigned)std::clamp((rows + groups - 1) / groups, 1, 1 << 20);
  const auto [btpr, unused] = row_layout(C, 3 * vec<T>(), 0);
  (void)unused;
  const int bgroups = bwd_groups(C, btpr);
  const size_t smem = (size_t)bgroups * C * 4 + (size_t)C * sizeof(T);
  const int bblocks = std::max(std::min(resident, (rows + bgroups - 1) / bgroups), 1);
  std::vector<float> part((size_t)bblocks * C, NAN);
  const T *xp = x.at(), *wp = w.at(), *gp = dy.at();
  if constexpr (std::is_same_v<T, float>) {
    emu_launch(rmsnorm_fwd_f32, Dim3{fblocks, 1, 1}, Dim3{(unsigned)tpr, (unsigned)groups, 1}, 0, xp,
               wp, y.at(), rows, C, inv_c, eps);
    emu_launch(rmsnorm_bwd_f32, Dim3{(unsigned)bblocks, 1, 1}, Dim3{(unsigned)btpr, (unsigned)bgroups, 1},
               smem, xp, wp, gp, dx.at(), part.data(), rows, C, inv_c, eps);
    emu_launch(rmsnorm_dw_f32, Dim3{(unsigned)(C + 31) / 32, 1, 1}, Dim3{32, 32, 1}, 0,
               (const float*)part.data(), dw.at(), bblocks, C);
  } else {
    emu_launch(rmsnorm_fwd_bf16, Dim3{fblocks, 1, 1}, Dim3{(unsigned)tpr, (unsigned)groups, 1}, 0, xp,
               wp, y.at(), rows, C, inv_c, eps);
    emu_launch(rmsnorm_bwd_bf16, Dim3{(unsigned)bblocks, 1, 1}, Dim3{(unsigned)btpr, (unsigned)bgroups, 1},
               smem, xp, wp, gp, dx.at(), part.data(), rows, C, inv_c, eps);
    emu_launch(rmsnorm_dw_bf16, Dim3{(unsigned)(C + 31) / 32, 1, 1}, Dim3{32, 32, 1}, 0,
               (const float*)part.data(), dw.at(), bblocks, C);
  }
  // The reference in double, with the kernels' roundings to T (the normalised value before
  // the weight, and each output).
  std::vector<double> rs(rows), m(rows), wy(n), wdx(n), wdw(C, 0.0);
  for (int r = 0; r < rows; r++) {
    double ss = 0, dot = 0;
    for (int c = 0; c < C; c++) {
      const double xv = x.get((size_t)r * C + c);
      ss += xv * xv;
      dot += dy.get((size_t)r * C + c) * w.get(c) * xv;
    }
    rs[r] = 1.0 / std::sqrt(ss / C + eps);
    m[r] = dot * rs[r] / C;
    for (int c = 0; c < C; c++) {
      const size_t i = (size_t)r * C + c;
      const double nv = x.get(i) * rs[r], nt = f(t_of<T>((float)nv));
      wy[i] = nt * w.get(c);
      wdx[i] = rs[r] * (dy.get(i) * w.get(c) - nv * m[r]);
      wdw[c] += dy.get(i) * nt;
    }
  }
  const bool bf = std::is_same_v<T, bf16>;
  const std::string at = std::string(" ") + name<T>() + " rows " + std::to_string(rows) + " C " +
                         std::to_string(C) + " off " + std::to_string(off);
  check("rmsnorm_fwd" + at + " grid " + std::to_string(fblocks), n, [&](size_t i) { return y.get(i); },
        [&](size_t i) { return wy[i]; }, bf ? 1.0 / 128 : 1e-5, 1e-5);
  check("rmsnorm_bwd dx" + at + " grid " + std::to_string(bblocks), n, [&](size_t i) { return dx.get(i); },
        [&](size_t i) { return wdx[i]; }, bf ? 1.0 / 128 : 1e-4, bf ? 2e-2 : 1e-5);
  check("rmsnorm_dw" + at + " grid " + std::to_string(bblocks), C, [&](size_t i) { return dw.get(i); },
        [&](size_t i) { return wdw[i]; }, bf ? 1.0 / 128 : 1e-4, bf ? 2e-2 : 1e-4);
}

// ---- rotary.cu --------------------------------------------------------------------------

template <typename T>
void rotary(int bt, int H, int D, int off, float sgn) {
  const int half = D / 2;
  const size_t n = (size_t)bt * H * D;
  auto x = random<T>(n, off, 2.f, 21 + D);
  Buf<float> c(bt * half, off), s(bt * half, off);
  for (int i = 0; i < bt * half; i++) {
    c.at()[i] = std::cos(0.37f * i + 0.1f);
    s.at()[i] = std::sin(0.37f * i + 0.1f);
  }
  Buf<T> y(n, off);
  // rotary.rs: 16 bytes per item where D/2 allows, blocks of 256 over the items.
  const int per = half % vec<T>() == 0 ? vec<T>() : 1;
  const size_t items = (size_t)bt * H * half / per;
  const unsigned blocks = (unsigned)std::clamp<size_t>((items + 255) / 256, 1, 1 << 20);
  const T* xp = x.at();
  const float *cp = c.at(), *sp = s.at();
  if constexpr (std::is_same_v<T, float>)
    emu_launch(rotary_f32, Dim3{blocks, 1, 1}, 256, 0, xp, cp, sp, y.at(), bt, H, D, sgn);
  else
    emu_launch(rotary_bf16, Dim3{blocks, 1, 1}, 256, 0, xp, cp, sp, y.at(), bt, H, D, sgn);
  auto want = [&](size_t i) {
    const size_t row = i / (H * D), j = i % D, k = row * half + j % half;
    const float sj = sgn * s.get(k), cj = c.get(k);
    const float a = x.get(i), b = j < (size_t)half ? x.get(i + half) : x.get(i - half);
    return f(t_of<T>(j < (size_t)half ? a * cj - b * sj : a * cj + b * sj));
  };
  same(std::string("rotary ") + name<T>() + (sgn > 0 ? " forward" : " inverse") + " B·T " +
           std::to_string(bt) + " H " + std::to_string(H) + " D " + std::to_string(D) + " off " +
           std::to_string(off),
       n, [&](size_t i) { return y.get(i); }, want);
}

// ---- grad_accum.cu ----------------------------------------------------------------------

template <typename A, typename B>
void grad_sum(size_t n, int off, bool in_place) {
  auto a = random<A>(n, off, 3.f, 31), b = random<B>(n, off, 3.f, 32);
  Buf<float> out(n, off);
  const auto ka = a;
  float* o = in_place ? reinterpret_cast<float*>(a.at()) : out.at();
  const unsigned blocks = (unsigned)std::min<size_t>((n + 255) / 256, 132 * 16) / (n > 2048 ? 4 : 1);
  void (*k)(const A*, const B*, float*, long) = nullptr;
  if constexpr (std::is_same_v<A, float> && std::is_same_v<B, float>) k = grad_sum_f32_f32;
  if constexpr (std::is_same_v<A, float> && std::is_same_v<B, bf16>) k = grad_sum_f32_bf16;
  if constexpr (std::is_same_v<A, bf16> && std::is_same_v<B, float>) k = grad_sum_bf16_f32;
  if constexpr (std::is_same_v<A, bf16> && std::is_same_v<B, bf16>) k = grad_sum_bf16_bf16;
  emu_launch(k, Dim3{std::max(blocks, 1u), 1, 1}, 256, 0, (const A*)a.at(), (const B*)b.at(), o, (long)n);
  same(std::string("grad_sum ") + name<A>() + " + " + name<B>() + (in_place ? " in place" : "") +
           " n " + std::to_string(n),
       n, [&](size_t i) { return o[i]; }, [&](size_t i) { return __fadd_rn(ka.get(i), b.get(i)); });
}

template <typename T>
void grad_scale(size_t n, int off, bool one_block) {
  auto x = random<T>(n, off, 3.f, 41);
  const auto x0 = x;
  const float s = 0.3712345f;
  const unsigned blocks = one_block ? 1 : vec16_blocks<T>(n);
  if constexpr (std::is_same_v<T, float>)
    emu_launch(grad_scale_f32, Dim3{blocks, 1, 1}, 256, 0, x.at(), (const float*)&s, (long)n);
  else
    emu_launch(grad_scale_bf16, Dim3{blocks, 1, 1}, 256, 0, x.at(), (const float*)&s, (long)n);
  const float k = f(t_of<T>(s));
  same(std::string("grad_scale ") + name<T>() + " n " + std::to_string(n) + " off " +
           std::to_string(off) + " grid " + std::to_string(blocks),
       n, [&](size_t i) { return x.get(i); },
       [&](size_t i) { return f(t_of<T>(__fmul_rn(x0.get(i), k))); });
}

// ---- adamw.cu ---------------------------------------------------------------------------

template <typename G>
void adamw(size_t n, bool has_g, bool has_pb) {
  auto p = random<float>(n, 0, 1.f, 51), m = random<float>(n, 0, 0.1f, 52);
  auto v = random<float>(n, 0, 0.01f, 53);
  for (size_t i = 0; i < n; i++) v.at()[i] = std::fabs(v.at()[i]);
  auto g = random<G>(n, 0, 2.f, 54);
  Buf<float> po(n, 0), mo(n, 0), vo(n, 0);
  Buf<bf16> pb(n, 0);
  const float coef = 0.7f, b1 = 0.9f, b2 = 0.999f, decay = 1 - 1e-2f * 1e-3f, inv_b2 = 1 / std::sqrt(1 - 0.999f),
              eps = 1e-8f, step = 1e-3f / (1 - 0.9f);
  const unsigned blocks = (unsigned)std::min<size_t>((n + 255) / 256, 132 * 16);
  const float *pp = p.at(), *mp = m.at(), *vp = v.at();
  const G* gp = g.at();
  auto k = std::is_same_v<G, float> ? (void (*)(const float*, const float*, const float*, const G*, int, float*,
                                                float*, float*, bf16*, int, long, float, float, float, float,
                                                float, float, float, float, float))adamw_step_f32
                                    : (void (*)(const float*, const float*, const float*, const G*, int, float*,
                                                float*, float*, bf16*, int, long, float, float, float, float,
                                                float, float, float, float, float))adamw_step_bf16;
  emu_launch(k, Dim3{blocks, 1, 1}, 256, 0, pp, mp, vp, gp, (int)has_g, po.at(), mo.at(), vo.at(), pb.at(),
             (int)has_pb, (long)n, coef, b1, 1 - b1, b2, 1 - b2, decay, inv_b2, eps, step);
  // adamw.rs's reference: the same correctly rounded operations in the same order.
  std::vector<float> wp(n), wm(n), wv(n);
  for (size_t i = 0; i < n; i++) {
    // Each product rounded on its own (the kernel's + 0: no FMA contraction on the GPU).
    const float gs = has_g ? f(g.at()[i]) * coef + 0.f : 0.f;
    wm[i] = (m.get(i) * b1 + 0.f) + (gs * (1 - b1) + 0.f);
    wv[i] = (v.get(i) * b2 + 0.f) + (gs * gs * (1 - b2) + 0.f);
    const float den = (std::sqrt(wv[i]) * inv_b2 + 0.f) + eps;
    wp[i] = (p.get(i) * decay + 0.f) - (wm[i] / den * step + 0.f);
  }
  const std::string at = std::string(" ") + name<G>() + (has_g ? "" : " no gradient") + " n " + std::to_string(n);
  same("adamw_step p" + at, n, [&](size_t i) { return po.get(i); }, [&](size_t i) { return wp[i]; });
  same("adamw_step m" + at, n, [&](size_t i) { return mo.get(i); }, [&](size_t i) { return wm[i]; });
  same("adamw_step v" + at, n, [&](size_t i) { return vo.get(i); }, [&](size_t i) { return wv[i]; });
  if (has_pb)
    same("adamw_step bf16 copy" + at, n, [&](size_t i) { return pb.get(i); },
         [&](size_t i) { return f(t_of<bf16>(wp[i])); });
}

// ---- grad_norm.cu -----------------------------------------------------------------------

template <typename T>
void grad_norm(long chunk) {
  // Tensors of two chunks and a bit, a few elements, and one that starts off 16-byte
  // alignment (a view's storage: its chunks take the element-by-element loop).
  std::vector<Buf<T>> ts;
  ts.push_back(random<T>(2 * chunk + 37, 0, 1.f, 61));
  ts.push_back(random<T>(5, 0, 1.f, 62));
  ts.push_back(random<T>(chunk + 1001, 1, 1.f, 63));
  std::vector<unsigned long long> ptrs;
  std::vector<long> sizes;
  std::vector<int> starts;
  int total = 0;
  double want = 0;
  for (auto& b : ts) {
    const long n = (long)b.v.size() - 8;
    ptrs.push_back(reinterpret_cast<unsigned long long>(b.at()));
    sizes.push_back(n);
    starts.push_back(total);
    total += (int)((n + chunk - 1) / chunk);
    for (long i = 0; i < n; i++) want += (double)b.get(i) * b.get(i);
  }
  std::vector<double> part(total, NAN);
  double out = NAN;
  const auto k = std::is_same_v<T, float> ? (void (*)(const unsigned long long*, const long*, const int*, int,
                                                      long, double*))sumsq_chunks_f32
                                          : (void (*)(const unsigned long long*, const long*, const int*, int,
                                                      long, double*))sumsq_chunks_bf16;
  emu_launch(k, Dim3{(unsigned)total, 1, 1}, 256, 0, (const unsigned long long*)ptrs.data(),
             (const long*)sizes.data(), (const int*)starts.data(), (int)ts.size(), chunk, part.data());
  emu_launch(sumsq_finish, Dim3{1, 1, 1}, 1024, 0, (const double*)part.data(), total, &out);
  check(std::string("sumsq_chunks + sumsq_finish ") + name<T>() + " chunk " + std::to_string(chunk) +
            " (" + std::to_string(total) + " chunks)",
        1, [&](size_t) { return (float)out; }, [&](size_t) { return std::sqrt(want); }, 1e-7, 0);
}

// ---- attn_softmax.cu --------------------------------------------------------------------

// attn_delta over (B, T, H, D) rows; then attn_softmax_fwd / _bwd on the block of query rows
// [t0, t0 + n) and keys [lo, lo + m) of a (T, S) attention with segments (one padded), a
// causal rule and a window, against their definitions in double precision.
template <typename T>
void attn_softmax(int B, int T_, int S, int H, int D) {
  const int rows = B * T_ * H;
  auto dout = random<T>((size_t)rows * D, 0, 1.f, 71), o = random<T>((size_t)rows * D, 0, 1.f, 72);
  std::vector<float> delta((size_t)rows, NAN);
  emu_launch(std::is_same_v<T, float> ? (void (*)(const T*, const T*, float*, int, int, int, int))attn_delta_f32
                                      : (void (*)(const T*, const T*, float*, int, int, int, int))attn_delta_bf16,
             Dim3{(unsigned)(rows + 7) / 8, 1, 1}, 256, 0, (const T*)dout.at(), (const T*)o.at(), delta.data(),
             rows, H, T_, D);
  check(std::string("attn_delta ") + name<T>() + " B·T·H " + std::to_string(rows) + " D " + std::to_string(D),
        rows, [&](size_t r) { return delta[r]; },
        [&](size_t r) {
          // delta is (B, H, T); dO and O are (B, T, H, D).
          const size_t b = r / ((size_t)H * T_), h = (r / T_) % H, t = r % T_;
          const size_t at = ((b * T_ + t) * H + h) * D;
          double acc = 0;
          for (int d = 0; d < D; d++) acc += (double)dout.get(at + d) * o.get(at + d);
          return acc;
        },
        1e-5, 1e-5);
  // The block: rows t0 … t0 + n of every (b, h), keys lo … lo + m.
  const int t0 = 5, n = std::min(37, T_ - t0), lo = 3, m = std::min(70, S - lo), causal = 1, window = 40;
  const float scale = 0.3f;
  std::vector<unsigned> qseg((size_t)B * T_), kseg((size_t)B * S);
  for (int b = 0; b < B; b++) {
    for (int s = 0; s < S; s++) kseg[(size_t)b * S + s] = 1 + s / 29;
    for (int t = 0; t < T_; t++) qseg[(size_t)b * T_ + t] = kseg[(size_t)b * S + S - T_ + t];
  }
  qseg[(size_t)t0 + 3] = 0;  // a padded query row of batch row 0, in the block: no key
  const int brows = B * H * n;
  const size_t total = (size_t)brows * m;
  auto x = random<T>(total, 0, 6.f, 73), dp = random<T>(total, 0, 1.f, 74);
  Buf<T> p(total, 0), p2(total, 0), ds(total, 0);
  std::vector<float> lse(brows, NAN), bdelta(brows);
  for (int r = 0; r < brows; r++) bdelta[r] = 0.01f * (r % 17) - 0.05f;
  auto allowed = [&](int r, int j) {
    const int i = r % n, b = r / (n * H), t = t0 + i, qpos = S - T_ + t, s = lo + j;
    const unsigned qs = qseg[(size_t)b * T_ + t], ks = kseg[(size_t)b * S + s];
    return qs != 0u && qs == ks && (!causal || s <= qpos) && qpos - s < window;
  };
  if constexpr (std::is_same_v<T, float>) {
    emu_launch(attn_softmax_fwd_f32, Dim3{(unsigned)(brows + 7) / 8, 1, 1}, 256, 0, (const T*)x.at(),
               (const unsigned*)qseg.data(), (const unsigned*)kseg.data(), p.at(), lse.data(), brows, H, n, m,
               T_, S, t0, lo, scale, causal, window);
    emu_launch(attn_softmax_bwd_f32, Dim3{(unsigned)std::min<size_t>((total + 255) / 256, 132 * 32) / 4, 1, 1}, 256,
               0, (const T*)x.at(), (const T*)dp.at(), (const float*)lse.data(), (const float*)bdelta.data(),
               (const unsigned*)qseg.data(), (const unsigned*)kseg.data(), p2.at(), ds.at(), (long long)total,
               H, n, m, T_, S, t0, lo, scale, causal, window);
  } else {
    emu_launch(attn_softmax_fwd_bf16, Dim3{(unsigned)(brows + 7) / 8, 1, 1}, 256, 0, (const T*)x.at(),
               (const unsigned*)qseg.data(), (const unsigned*)kseg.data(), p.at(), lse.data(), brows, H, n, m,
               T_, S, t0, lo, scale, causal, window);
    emu_launch(attn_softmax_bwd_bf16, Dim3{(unsigned)std::min<size_t>((total + 255) / 256, 132 * 32) / 4, 1, 1},
               256, 0, (const T*)x.at(), (const T*)dp.at(), (const float*)lse.data(), (const float*)bdelta.data(),
               (const unsigned*)qseg.data(), (const unsigned*)kseg.data(), p2.at(), ds.at(), (long long)total,
               H, n, m, T_, S, t0, lo, scale, causal, window);
  }
  // The reference: each row's softmax over its allowed keys (lse −∞ and p 0 without any).
  std::vector<double> wl(brows), wp(total);
  size_t empty = 0;
  for (int r = 0; r < brows; r++) {
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j < m; j++)
      if (allowed(r, j)) mx = std::max(mx, (double)scale * x.get((size_t)r * m + j));
    for (int j = 0; j < m; j++)
      if (allowed(r, j)) sum += std::exp((double)scale * x.get((size_t)r * m + j) - mx);
    wl[r] = sum > 0 ? mx + std::log(sum) : -INFINITY;
    empty += sum == 0;
    for (int j = 0; j < m; j++)
      wp[(size_t)r * m + j] = allowed(r, j) ? std::exp((double)scale * x.get((size_t)r * m + j) - wl[r]) : 0.0;
  }
  const double rtol = std::is_same_v<T, float> ? 1e-5 : 1.0 / 128;
  const std::string at = std::string(" ") + name<T>() + " (" + std::to_string(brows) + " rows × " +
                         std::to_string(m) + " keys, " + std::to_string(empty) + " rows without a key)";
  check("attn_softmax_fwd lse" + at, brows, [&](size_t r) { return std::isinf(lse[r]) && std::isinf(wl[r]) ? 0.f : lse[r]; },
        [&](size_t r) { return std::isinf(lse[r]) && std::isinf(wl[r]) ? 0.0 : wl[r]; }, 1e-6, 1e-6);
  check("attn_softmax_fwd p" + at, total, [&](size_t i) { return p.get(i); }, [&](size_t i) { return wp[i]; },
        rtol, 1e-7);
  // The backward's p from the kernel's lse, and dS = scale · p · (dP − Δ).
  check("attn_softmax_bwd p" + at, total, [&](size_t i) { return p2.get(i); }, [&](size_t i) { return wp[i]; },
        rtol, 1e-6);
  check("attn_softmax_bwd dS" + at, total, [&](size_t i) { return ds.get(i); },
        [&](size_t i) { return scale * wp[i] * (dp.get(i) - (double)bdelta[i / m]); }, rtol, 1e-6);
}

}  // namespace

int main() {
  for (int off : {0, 1}) {
    swiglu<float>(3 * 2 * 256 * 4 + 5, off, true);
    swiglu<float>(3 * 2 * 256 * 4 + 5, off, false);
    swiglu<bf16>(3 * 2 * 256 * 8 + 5, off, true);
    swiglu<bf16>(3 * 2 * 256 * 8 + 5, off, false);
  }
  swiglu<bf16>(7, 0, false);
  for (int resident : {1, 3, 1 << 20}) {
    rmsnorm<float>(19, 96, 0, resident);
    rmsnorm<bf16>(19, 1280, 0, resident);
  }
  rmsnorm<bf16>(9, 3584, 0, 4);
  rmsnorm<float>(9, 3584, 0, 4);
  rmsnorm<bf16>(7, 1000, 0, 2);  // C not a multiple of 8: the scalar paths
  rmsnorm<float>(7, 96, 1, 2);   // x one element off alignment
  rmsnorm<bf16>(5, 7, 0, 3);
  for (float sgn : {1.f, -1.f}) {
    rotary<bf16>(6, 3, 128, 0, sgn);
    rotary<float>(6, 3, 80, 0, sgn);
  }
  rotary<bf16>(5, 2, 80, 0, 1.f);
  rotary<bf16>(5, 2, 6, 0, 1.f);  // D/2 = 3: one element per item
  rotary<float>(4, 3, 64, 1, -1.f);
  grad_sum<float, float>(3000, 0, false);
  grad_sum<float, bf16>(3000, 0, false);
  grad_sum<bf16, float>(3001, 1, false);
  grad_sum<bf16, bf16>(3000, 0, false);
  grad_sum<float, float>(3000, 0, true);
  grad_sum<float, bf16>(3001, 1, true);
  for (bool one : {true, false}) {
    grad_scale<float>(3 * 2 * 256 * 4 + 3, 0, one);
    grad_scale<bf16>(3 * 2 * 256 * 8 + 3, 0, one);
  }
  grad_scale<bf16>(1000, 1, false);
  adamw<float>(1500, true, false);
  adamw<bf16>(1500, true, true);
  adamw<float>(700, false, true);
  for (long chunk : {65536L, 300L}) {
    grad_norm<float>(chunk);
    grad_norm<bf16>(chunk);
  }
  attn_softmax<float>(2, 60, 80, 3, 64);
  attn_softmax<bf16>(2, 60, 80, 3, 128);
  attn_softmax<bf16>(1, 42, 48, 2, 80);
  std::printf("memory-bound kernels: %s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
