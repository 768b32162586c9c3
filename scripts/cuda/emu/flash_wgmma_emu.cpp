// flash_wgmma_emu.cpp: kernels/flash_wgmma_sm90a.cu and wgmma_probe_sm90a.cu on the CPU
// (cuda_emu.h) against attention in double precision (attention_ref.h): the layout probe (f32
// sums of bf16 products, 1e-4), then the forward (o, lse; plain and pipelined) and the
// backward (dq, dk, dv) on every case of ref::CASES. Exits 1 on any failure. Built and run by
// run.sh.
#define OMR_EMU "cuda_emu.h"
#include "../../../kernels/flash_wgmma_sm90a.cu"
#include "../../../kernels/wgmma_probe_sm90a.cu"
#include "attention_ref.h"

namespace {

using ref::f;

void probe() {
  const auto a = ref::rand_bf16(64 * 128, 1.f), bk = ref::rand_bf16(128 * 128, 1.f);
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
  ref::report("probe s = a·bk^T (K-major, K-major)", ref::rel_err(s, rs), 1e-4);
  ref::report("probe o = a·bk (A registers, B N-major)", ref::rel_err(o, ro), 1e-4);
  ref::report("probe s64 = bk[64:]·a^T (A at row 64 of a tile)", ref::rel_err(s64, rs64), 1e-4);
  ref::report("probe o64 = bk[:64,:64]·a (B a 64-row tile N-major)", ref::rel_err(o64, ro64), 1e-4);
  ref::report("probe q64 = bk[:,:64]^T·bk[:,64:] (A M-major)", ref::rel_err(q64, rq64), 1e-4);
}

void attention(const ref::Case& c) {
  const ref::Problem p = ref::problem(c, 128);
  const int B = c.B, T = c.T, S = c.S, H = c.H;
  std::vector<int> fspan, bspan;
  p.spans(128, 128, fspan, bspan);
  std::vector<bf16> o(p.o.size(), __float2bfloat16_rn(NAN));
  std::vector<float> lse(p.lse.size(), NAN);
  const float scale_log2 = p.scale * 1.4426950408889634f;
  emu_launch(flash_wg_fwd_d128, Dim3{(unsigned)((T + 127) / 128), (unsigned)(B * H), 1}, 256,
             WG_SMEM, p.q.data(), p.k.data(), p.v.data(), p.qseg.data(), p.kseg.data(),
             fspan.data(), o.data(), lse.data(), T, S, H, c.KV, scale_log2, (int)c.causal,
             c.window);
  const std::string n = std::string("wg ") + c.name;
  p.check_forward(n, o, lse);
  // The pipelined forward (softmax of tile j under P·V of tile j − 1): the same results.
  std::vector<bf16> op(p.o.size(), __float2bfloat16_rn(NAN));
  std::vector<float> lsep(p.lse.size(), NAN);
  emu_launch(flash_wg_fwd_pipe_d128, Dim3{(unsigned)((T + 127) / 128), (unsigned)(B * H), 1},
             256, WG_PIPE_SMEM, p.q.data(), p.k.data(), p.v.data(), p.qseg.data(),
             p.kseg.data(), fspan.data(), op.data(), lsep.data(), T, S, H, c.KV, scale_log2,
             (int)c.causal, c.window);
  p.check_forward(std::string("wg pipelined ") + c.name, op, lsep);
  const std::vector<float> delta = p.delta(o);
  std::vector<float> dq(p.dq.size(), 0.f), dk(p.dk.size(), NAN), dv(p.dv.size(), NAN);
  emu_launch(flash_wg_bwd_d128, Dim3{(unsigned)((S + 127) / 128), (unsigned)(B * H), 1}, 256,
             WG_BWD_SMEM, p.q.data(), p.k.data(), p.v.data(), p.dout.data(), lse.data(),
             delta.data(), p.qseg.data(), p.kseg.data(), bspan.data(), dq.data(), dk.data(),
             dv.data(), T, S, H, c.KV, p.scale, (int)c.causal, c.window);
  p.check_backward(n, dq, dk, dv);
}

}  // namespace

int main() {
  probe();
  for (const ref::Case& c : ref::CASES) attention(c);
  std::printf("flash_wgmma %s: %d failure(s)\n", ref::failures ? "FAILED" : "all passed",
              ref::failures);
  return ref::failures ? 1 : 0;
}
