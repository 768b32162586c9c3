// flash_wgmma_emu.cpp: kernels/flash_wgmma_sm90a.cu on the CPU (sm90_emu.h) against attention
// computed in double precision: the layout probe, then forward (o, lse) and backward (dq, dk,
// dv) on packed causal rows with padding and GQA, a cache with a window, one unmasked segment
// (whole tiles) and one causal segment (whole tiles next to the diagonal's). Inputs are bf16 as on the GPU; the tolerances are omr bench kernels'
// (max |got − ref| / max |ref|: 1e-4 for the probe's f32 sums of bf16 products, 3e-2 for
// attention, whose P and dS pass through bf16; lse 1e-3, and −∞ exactly where no key is
// allowed). Exits 1 on any failure. Built and run by run.sh.
#define OMR_EMU "sm90_emu.h"
#include "../../../kernels/flash_wgmma_sm90a.cu"

#include <random>
#include <string>

namespace {

std::mt19937_64 rng(7);

std::vector<bf16> rand_bf16(size_t n, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<bf16> v(n);
  for (auto& x : v) x = __float2bfloat16_rn(u(rng));
  return v;
}

double f(bf16 x) { return (double)__bfloat162float(x); }

int failures = 0;

void report(const std::string& name, double err, double tol) {
  const bool ok = err <= tol;  // NaN fails
  if (!ok) failures++;
  std::printf("%-58s %.3e (tol %.0e) %s\n", name.c_str(), err, tol, ok ? "ok" : "FAIL");
}

// max |got − ref| / max |ref| (NaN if anything is not finite).
template <class G>
double rel_err(const std::vector<G>& got, const std::vector<double>& ref) {
  double scale = 1e-30, worst = 0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  for (size_t i = 0; i < ref.size(); i++) {
    double g;
    if constexpr (std::is_same_v<G, bf16>)
      g = f(got[i]);
    else
      g = got[i];
    const double d = std::fabs(g - ref[i]);
    if (!std::isfinite(d)) return NAN;
    worst = std::max(worst, d);
  }
  return worst / scale;
}

void probe() {
  const auto a = rand_bf16(64 * 128, 1.f), bk = rand_bf16(128 * 128, 1.f);
  std::vector<float> s(64 * 128, NAN), o(64 * 128, NAN), s64(64 * 64, NAN), o64(64 * 128, NAN),
      q64(64 * 64, NAN);
  emu_launch(wgmma_probe, Dim3{1, 1, 1}, 128, WG_PROBE_SMEM, a.data(), bk.data(), s.data(),
             o.data(), s64.data(), o64.data(), q64.data());
  auto A = [&](int r, int c) { return f(a[r * 128 + c]); };
  auto Bk = [&](int r, int c) { return f(bk[r * 128 + c]); };
  std::vector<double> rs(64 * 128), ro(64 * 128), rs64(64 * 64), ro64(64 * 128), rq64(64 * 64);
  for (int i = 0; i < 64; i++)
    for (int j = 0; j < 128; j++) {
      double x = 0, y = 0, z = 0;
      for (int k = 0; k < 128; k++) {
        x += A(i, k) * Bk(j, k);
        y += A(i, k) * Bk(k, j);
      }
      for (int k = 0; k < 64; k++) z += Bk(i, k) * A(k, j);
      rs[i * 128 + j] = x;
      ro[i * 128 + j] = y;
      ro64[i * 128 + j] = z;
    }
  for (int i = 0; i < 64; i++)
    for (int j = 0; j < 64; j++) {
      double x = 0, y = 0;
      for (int k = 0; k < 128; k++) {
        x += Bk(64 + i, k) * A(j, k);
        y += Bk(k, i) * Bk(k, 64 + j);
      }
      rs64[i * 64 + j] = x;
      rq64[i * 64 + j] = y;
    }
  report("probe s = a·bk^T (K-major, K-major)", rel_err(s, rs), 1e-4);
  report("probe o = a·bk (A registers, B N-major)", rel_err(o, ro), 1e-4);
  report("probe s64 = bk[64:]·a^T (A at row 64 of a tile)", rel_err(s64, rs64), 1e-4);
  report("probe o64 = bk[:64,:64]·a (B a 64-row tile N-major)", rel_err(o64, ro64), 1e-4);
  report("probe q64 = bk[:,:64]^T·bk[:,64:] (A M-major)", rel_err(q64, rq64), 1e-4);
}

struct Case {
  const char* name;
  int B, T, S, H, KV;
  bool causal;
  int window;
  bool packed;  // segments of 97 positions, batch row 0 padded past 290 (as check.rs)
};

void attention(const Case& c) {
  const int B = c.B, T = c.T, S = c.S, H = c.H, KV = c.KV, D = 128, off = S - T;
  const float scale = 1.f / std::sqrt((float)D);
  std::vector<unsigned> kseg(B * S), qseg(B * T);
  for (int b = 0; b < B; b++) {
    for (int j = 0; j < S; j++)
      kseg[b * S + j] = c.packed ? ((b == 0 && j >= 290) ? 0u : 1u + j / 97) : 1u;
    for (int i = 0; i < T; i++) qseg[b * T + i] = kseg[b * S + i + off];
  }
  auto allowed_ = [&](int b, int i, int j) {
    const unsigned qs = qseg[b * T + i], ks = kseg[b * S + j];
    return qs != 0u && qs == ks && (!c.causal || j <= i + off) && (c.window == 0 || j + c.window > i + off);
  };
  // Exact spans: per (b, 128 query rows) the keys any of them may see, per (b, 128 keys) the
  // rows that may see any of them; [lo, hi) = [first, last + 1), (0, 0) when empty.
  const int nq = (T + 127) / 128, nk = (S + 127) / 128;
  std::vector<int> fspan(2 * B * nq, 0), bspan(2 * B * nk, 0);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < T; i++)
      for (int j = 0; j < S; j++) {
        if (!allowed_(b, i, j)) continue;
        int* fs = &fspan[2 * (b * nq + i / 128)];
        int* bs = &bspan[2 * (b * nk + j / 128)];
        if (fs[1] == 0) fs[0] = j;
        fs[0] = std::min(fs[0], j);
        fs[1] = std::max(fs[1], j + 1);
        if (bs[1] == 0) bs[0] = i;
        bs[0] = std::min(bs[0], i);
        bs[1] = std::max(bs[1], i + 1);
      }
  const auto q = rand_bf16((size_t)B * T * H * D, 1.5f), k = rand_bf16((size_t)B * S * KV * D, 1.5f),
             v = rand_bf16((size_t)B * S * KV * D, 1.f), dout = rand_bf16((size_t)B * T * H * D, 1.f);
  auto Q = [&](int b, int i, int h, int d) { return f(q[(((size_t)b * T + i) * H + h) * D + d]); };
  auto K = [&](int b, int j, int h, int d) { return f(k[(((size_t)b * S + j) * KV + h / (H / KV)) * D + d]); };
  auto V = [&](int b, int j, int h, int d) { return f(v[(((size_t)b * S + j) * KV + h / (H / KV)) * D + d]); };
  auto dO = [&](int b, int i, int h, int d) { return f(dout[(((size_t)b * T + i) * H + h) * D + d]); };

  // Reference, double.
  std::vector<double> ro((size_t)B * T * H * D, 0), rlse((size_t)B * H * T), rdq(ro.size(), 0),
      rdk((size_t)B * S * H * D, 0), rdv(rdk.size(), 0);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < T; i++) {
        std::vector<double> p(S, 0), dp(S, 0);
        double mx = -INFINITY;
        for (int j = 0; j < S; j++) {
          if (!allowed_(b, i, j)) continue;
          double x = 0;
          for (int d = 0; d < D; d++) x += Q(b, i, h, d) * K(b, j, h, d);
          p[j] = x * scale;
          mx = std::max(mx, p[j]);
        }
        double l = 0;
        for (int j = 0; j < S; j++) l += allowed_(b, i, j) ? std::exp(p[j] - mx) : 0.0;
        rlse[((size_t)b * H + h) * T + i] = l > 0 ? mx + std::log(l) : -INFINITY;
        for (int j = 0; j < S; j++) p[j] = allowed_(b, i, j) ? std::exp(p[j] - mx) / l : 0.0;
        double delta = 0;
        for (int d = 0; d < D; d++) {
          double o = 0;
          for (int j = 0; j < S; j++) o += p[j] * V(b, j, h, d);
          ro[(((size_t)b * T + i) * H + h) * D + d] = o;
          delta += o * dO(b, i, h, d);
        }
        for (int j = 0; j < S; j++) {
          if (p[j] == 0) continue;
          double x = 0;
          for (int d = 0; d < D; d++) x += dO(b, i, h, d) * V(b, j, h, d);
          const double ds = p[j] * (x - delta) * scale;
          for (int d = 0; d < D; d++) {
            rdq[(((size_t)b * T + i) * H + h) * D + d] += ds * K(b, j, h, d);
            rdk[(((size_t)b * S + j) * H + h) * D + d] += ds * Q(b, i, h, d);
            rdv[(((size_t)b * S + j) * H + h) * D + d] += p[j] * dO(b, i, h, d);
          }
        }
      }

  // Forward.
  std::vector<bf16> o(ro.size(), __float2bfloat16_rn(NAN));
  std::vector<float> lse(rlse.size(), NAN);
  const float scale_log2 = scale * 1.4426950408889634f;
  emu_launch(flash_wg_fwd_d128, Dim3{(unsigned)nq, (unsigned)(B * H), 1}, 256, WG_SMEM, q.data(),
             k.data(), v.data(), qseg.data(), kseg.data(), fspan.data(), o.data(), lse.data(), T, S,
             H, KV, scale_log2, (int)c.causal, c.window);
  const std::string n = c.name;
  report(n + ": forward o", rel_err(o, ro), 3e-2);
  double lerr = 0;
  for (size_t i = 0; i < lse.size(); i++) {
    if (std::isinf(rlse[i])) {
      if (!(std::isinf(lse[i]) && lse[i] < 0)) lerr = NAN;
    } else {
      lerr = std::max(lerr, std::fabs(lse[i] - rlse[i]) / std::max(1.0, std::fabs(rlse[i])));
    }
  }
  report(n + ": forward lse", lerr, 1e-3);

  // Backward, from the kernel's o and lse as in training: Δ = rowsum(dO ∘ O) in f32.
  std::vector<float> delta((size_t)B * H * T);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < T; i++) {
        float s = 0;
        for (int d = 0; d < D; d++)
          s += (float)(f(o[(((size_t)b * T + i) * H + h) * D + d]) * dO(b, i, h, d));
        delta[((size_t)b * H + h) * T + i] = s;
      }
  std::vector<float> dq(rdq.size(), 0.f), dk(rdk.size(), NAN), dv(rdv.size(), NAN);
  emu_launch(flash_wg_bwd_d128, Dim3{(unsigned)nk, (unsigned)(B * H), 1}, 256, WG_BWD_SMEM,
             q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), qseg.data(),
             kseg.data(), bspan.data(), dq.data(), dk.data(), dv.data(), T, S, H, KV, scale,
             (int)c.causal, c.window);
  report(n + ": backward dq", rel_err(dq, rdq), 3e-2);
  report(n + ": backward dk (per query head)", rel_err(dk, rdk), 3e-2);
  report(n + ": backward dv (per query head)", rel_err(dv, rdv), 3e-2);
}

}  // namespace

int main() {
  probe();
  const Case cases[] = {
      {"packed causal, padding, GQA 4/2, T 300", 2, 300, 300, 4, 2, true, 0, true},
      {"cache S 333 > T 270, window 100, causal", 1, 270, 333, 2, 1, true, 100, false},
      {"one segment, not causal, T 256 (whole tiles)", 1, 256, 256, 2, 2, false, 0, false},
      {"one segment, causal, S 400 > T 300, GQA 2/1 (whole + diag.)", 1, 300, 400, 2, 1, true, 0, false},
  };
  for (const Case& c : cases) attention(c);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? 1 : 0;
}
