//! CPU references of the flash attention (`crate::flash_attn`): what the op runs on the CPU
//! and what `kernels/flash_attn.cu`, the tensor-core kernels and the GEMM path are checked
//! against. Layouts and the mask as `flash_attn`'s module doc defines them.

use crate::flash_attn::Dims;

/// Key blocks of the forward reference.
const CPU_KEYS: usize = 64;

/// Forward reference: (o (B·T·H·D), lse (B·H·T)). Never more than one key block of scores.
#[allow(clippy::too_many_arguments)]
pub fn fwd_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_seg: &[u32],
    k_seg: &[u32],
    n: Dims,
    scale: f32,
    causal: bool,
    window: usize,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, t, s, h, kv, d } = n;
    let rep = h / kv;
    let off = s - t;
    let mut o = vec![0f32; b * t * h * d];
    let mut lse = vec![f32::NEG_INFINITY; b * h * t];
    let mut sc = [0f32; CPU_KEYS];
    for bi in 0..b {
        for ti in 0..t {
            let qpos = off + ti;
            let qs = q_seg[bi * t + ti];
            for hi in 0..h {
                let kh = hi / rep;
                let qr = &q[((bi * t + ti) * h + hi) * d..][..d];
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let mut acc = vec![0f32; d];
                for k0 in (0..s).step_by(CPU_KEYS) {
                    let kn = CPU_KEYS.min(s - k0);
                    let mut mt = f32::NEG_INFINITY;
                    for (j, scj) in sc.iter_mut().enumerate().take(kn) {
                        let sj = k0 + j;
                        *scj = if allowed(qpos, sj, qs, k_seg[bi * s + sj], causal, window) {
                            let kr = &k[((bi * s + sj) * kv + kh) * d..][..d];
                            qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        mt = mt.max(*scj);
                    }
                    let mn = m.max(mt);
                    if mn == f32::NEG_INFINITY {
                        continue;
                    }
                    let alpha = if m == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (m - mn).exp()
                    };
                    l *= alpha;
                    acc.iter_mut().for_each(|a| *a *= alpha);
                    for j in 0..kn {
                        let p = (sc[j] - mn).exp();
                        if p == 0.0 {
                            continue;
                        }
                        l += p;
                        let vr = &v[((bi * s + k0 + j) * kv + kh) * d..][..d];
                        acc.iter_mut().zip(vr).for_each(|(a, &x)| *a += p * x);
                    }
                    m = mn;
                }
                if l > 0.0 {
                    let out = &mut o[((bi * t + ti) * h + hi) * d..][..d];
                    out.iter_mut().zip(&acc).for_each(|(o, a)| *o = a / l);
                    lse[(bi * h + hi) * t + ti] = m + l.ln();
                }
            }
        }
    }
    (o, lse)
}

/// Backward reference: (dq, dk, dv) from the inputs, o, dO and the saved lse.
#[allow(clippy::too_many_arguments)]
pub fn bwd_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    q_seg: &[u32],
    k_seg: &[u32],
    n: Dims,
    scale: f32,
    causal: bool,
    window: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, t, s, h, kv, d } = n;
    let rep = h / kv;
    let off = s - t;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for bi in 0..b {
        for ti in 0..t {
            let qpos = off + ti;
            let qs = q_seg[bi * t + ti];
            for hi in 0..h {
                let z = lse[(bi * h + hi) * t + ti];
                if z == f32::NEG_INFINITY {
                    continue;
                }
                let kh = hi / rep;
                let base = ((bi * t + ti) * h + hi) * d;
                let (qr, gr, or) = (&q[base..][..d], &dout[base..][..d], &o[base..][..d]);
                let delta: f32 = gr.iter().zip(or).map(|(a, b)| a * b).sum();
                for sj in 0..s {
                    if !allowed(qpos, sj, qs, k_seg[bi * s + sj], causal, window) {
                        continue;
                    }
                    let kb = ((bi * s + sj) * kv + kh) * d;
                    let (kr, vr) = (&k[kb..][..d], &v[kb..][..d]);
                    let sc = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                    let p = (sc - z).exp();
                    let dp: f32 = gr.iter().zip(vr).map(|(a, b)| a * b).sum();
                    let ds = p * (dp - delta);
                    for e in 0..d {
                        dq[base + e] += scale * ds * kr[e];
                        dk[kb + e] += scale * ds * qr[e];
                        dv[kb + e] += p * gr[e];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

fn allowed(qpos: usize, s: usize, qs: u32, ks: u32, causal: bool, window: usize) -> bool {
    qs != 0 && qs == ks && (!causal || s <= qpos) && (window == 0 || s + window > qpos)
}
