//! Fused linear log-probabilities (GRPO's per-token scores) against the unfused composition:
//! z = zscale · h · wᵀ + bias, logp = −`omr_model::loss::token_nll`(z), entropy from the full
//! log-softmax, and dH, dW of Σ g · logp by candle autograd through the composition; a random
//! weight g per row (GRPO's per-token advantage), suppressed ids (bias −1e30), tiles that split
//! rows and vocabulary unevenly.
//!
//! Tolerances (max |a−b| / max |ref|): f32 1e-5 (statistics merged over tiles instead of one
//! pass); bf16 3e-2 against the f32 composition on the same rounded inputs (bf16 logits tiles
//! and bf16 dL); CUDA vs CPU 1e-4 f32 (cuBLAS vs CPU gemm order), 3e-2 bf16.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use common::{accel, check, rand};
use omr_kernels::linear_ce::LceChunks;
use omr_kernels::linear_logp::{linear_logp, LogpScore};

fn targets(n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect()
}

/// −1e30 on every 17th id that is nobody's target (the ids sampling suppresses).
fn score(v: usize, t: &[u32], zscale: f32, dev: &Device) -> Result<LogpScore> {
    let b: Vec<f32> = (0..v as u32)
        .map(|j| {
            if j % 17 == 5 && !t.contains(&j) {
                -1e30
            } else {
                0.0
            }
        })
        .collect();
    Ok(LogpScore {
        zscale,
        bias: Tensor::from_vec(b, v, dev)?,
    })
}

struct Out {
    logp: Tensor,
    entropy: Tensor,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
}

fn grads(
    logp: &Tensor,
    g: &Tensor,
    h: &Tensor,
    w: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let gs = (logp * g)?.sum_all()?.backward()?;
    Ok((gs.get(h).cloned(), gs.get(w).cloned()))
}

fn naive(h: &Tensor, w: &Tensor, t: &[u32], s: &LogpScore, g: &Tensor) -> Result<Out> {
    let logits = h.matmul(&w.t()?)?.to_dtype(DType::F32)?;
    let z = ((logits * s.zscale as f64)?).broadcast_add(&s.bias.unsqueeze(0)?)?;
    let logp = omr_model::loss::token_nll(&z, t)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .neg()?;
    let zd = z.detach();
    let max = zd.max_keepdim(D::Minus1)?;
    let sh = zd.broadcast_sub(&max)?;
    let ls = sh.broadcast_sub(&sh.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let entropy = (ls.exp()? * &ls)?.sum(1)?.neg()?;
    let (dh, dw) = grads(&logp, g, h, w)?;
    Ok(Out {
        logp,
        entropy,
        dh,
        dw,
    })
}

fn fused(
    h: &Tensor,
    w: &Tensor,
    t: &[u32],
    s: &LogpScore,
    g: &Tensor,
    ch: LceChunks,
) -> Result<Out> {
    let tt = Tensor::from_vec(t.to_vec(), t.len(), h.device())?;
    let (logp, entropy) = linear_logp(h, w, &tt, s, ch)?;
    let (dh, dw) = grads(&logp, g, h, w)?;
    Ok(Out {
        logp,
        entropy,
        dh,
        dw,
    })
}

fn compare(name: &str, a: &Out, b: &Out, tol: f64) -> Result<()> {
    check(&format!("{name} logp"), &a.logp, &b.logp, tol)?;
    check(&format!("{name} entropy"), &a.entropy, &b.entropy, tol)?;
    for (what, x, y) in [("dh", &a.dh, &b.dh), ("dw", &a.dw, &b.dw)] {
        match (x, y) {
            (Some(x), Some(y)) => check(&format!("{name} {what}"), x, y, tol)?,
            (None, None) => {}
            _ => panic!("{name} {what}: one side has a gradient, the other none"),
        }
    }
    Ok(())
}

#[test]
fn matches_unfused_f32() -> Result<()> {
    let (n, c, v) = (37, 48, 300);
    let h = Var::from_tensor(&rand(80, &[n, c], 1.0, DType::F32)?)?;
    let w = Var::from_tensor(&rand(81, &[v, c], 0.5, DType::F32)?)?;
    let g = rand(82, &[n], 1.0, DType::F32)?;
    let t = targets(n, v);
    let s = score(v, &t, 1.0 / 0.7, &Device::Cpu)?;
    let want = naive(h.as_tensor(), w.as_tensor(), &t, &s, &g)?;
    for ch in [
        LceChunks {
            rows: 16,
            vocab: 128,
            ..LceChunks::default()
        },
        LceChunks {
            rows: 64,
            vocab: 1024,
            ..LceChunks::default()
        },
        LceChunks {
            rows: 1,
            vocab: 7,
            ..LceChunks::default()
        },
    ] {
        let got = fused(h.as_tensor(), w.as_tensor(), &t, &s, &g, ch)?;
        compare(&format!("logp f32 {ch:?}"), &got, &want, 1e-5)?;
    }
    // The suppressed ids have probability 0: the entropy is that of the others alone.
    let lp: Vec<f32> = want.logp.to_vec1()?;
    assert!(lp.iter().all(|x| x.is_finite() && *x < 0.0), "{lp:?}");
    Ok(())
}

#[test]
fn frozen_inputs_get_no_gradient() -> Result<()> {
    let (n, c, v) = (21, 32, 200);
    let h = Var::from_tensor(&rand(83, &[n, c], 1.0, DType::F32)?)?;
    let w = Var::from_tensor(&rand(84, &[v, c], 0.5, DType::F32)?)?;
    let g = rand(85, &[n], 1.0, DType::F32)?;
    let t = targets(n, v);
    let s = score(v, &t, 1.0, &Device::Cpu)?;
    let ch = LceChunks {
        rows: 8,
        vocab: 64,
        ..LceChunks::default()
    };
    // A frozen head (LoRA): dh only. Frozen hidden states: dw only. Neither: no op attached.
    // (candle's autograd of the composition also hands the untracked side a gradient, which
    // the fused op does not compute.)
    for (hh, ww) in [
        (h.as_tensor().clone(), w.as_tensor().detach()),
        (h.as_tensor().detach(), w.as_tensor().clone()),
        (h.as_tensor().detach(), w.as_tensor().detach()),
    ] {
        let mut want = naive(&hh, &ww, &t, &s, &g)?;
        let got = fused(&hh, &ww, &t, &s, &g, ch)?;
        assert_eq!(got.dh.is_some(), hh.track_op(), "dh only for tracked h");
        assert_eq!(got.dw.is_some(), ww.track_op(), "dw only for tracked w");
        want.dh = want.dh.filter(|_| hh.track_op());
        want.dw = want.dw.filter(|_| ww.track_op());
        compare("logp frozen", &got, &want, 1e-5)?;
    }
    Ok(())
}

#[test]
fn bf16_close_to_f32() -> Result<()> {
    let (n, c, v) = (40, 64, 500);
    let h = Var::from_tensor(&rand(86, &[n, c], 1.0, DType::BF16)?)?;
    let w = Var::from_tensor(&rand(87, &[v, c], 0.5, DType::BF16)?)?;
    let g = rand(88, &[n], 1.0, DType::F32)?;
    let t = targets(n, v);
    let s = score(v, &t, 1.25, &Device::Cpu)?;
    let ch = LceChunks {
        rows: 16,
        vocab: 128,
        ..LceChunks::default()
    };
    let got = fused(h.as_tensor(), w.as_tensor(), &t, &s, &g, ch)?;
    let h32 = Var::from_tensor(&h.to_dtype(DType::F32)?)?;
    let w32 = Var::from_tensor(&w.to_dtype(DType::F32)?)?;
    let want = naive(h32.as_tensor(), w32.as_tensor(), &t, &s, &g)?;
    let up = |x: Option<Tensor>| x.map(|x| x.to_dtype(DType::F32)).transpose();
    let got = Out {
        dh: up(got.dh)?,
        dw: up(got.dw)?,
        ..got
    };
    compare("logp bf16", &got, &want, 3e-2)?;
    Ok(())
}

#[test]
fn empty_and_bad_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let w = rand(89, &[50, 8], 0.5, DType::F32)?;
    let s = score(50, &[], 1.0, &dev)?;
    let h = Tensor::zeros((0, 8), DType::F32, &dev)?;
    let t = Tensor::zeros(0, DType::U32, &dev)?;
    let (lp, ent) = linear_logp(&h, &w, &t, &s, LceChunks::default())?;
    assert_eq!((lp.dims(), ent.dims()), (&[0][..], &[0][..]));
    let h = rand(90, &[3, 8], 1.0, DType::F32)?;
    let t = Tensor::from_vec(vec![1u32, 2, 3], 3, &dev)?;
    let short = LogpScore {
        zscale: 1.0,
        bias: Tensor::zeros(49, DType::F32, &dev)?,
    };
    let e = linear_logp(&h, &w, &t, &short, LceChunks::default()).unwrap_err();
    assert!(e.to_string().contains("bias must be (50) f32"), "{e}");
    let cold = LogpScore { zscale: 0.0, ..s };
    let e = linear_logp(&h, &w, &t, &cold, LceChunks::default()).unwrap_err();
    assert!(e.to_string().contains("zscale"), "{e}");
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let (n, c, v) = (300, 256, 5000);
            let t = targets(n, v);
            let ch = LceChunks {
                rows: 128,
                vocab: 2048,
                ..LceChunks::default()
            };
            let h = rand(91, &[n, c], 1.0, dtype)?;
            let w = rand(92, &[v, c], 0.2, dtype)?;
            let g = rand(93, &[n], 1.0, DType::F32)?;
            let s = score(v, &t, 1.0 / 0.9, &Device::Cpu)?;
            let on = |x: &Tensor| -> Result<Tensor> {
                Var::from_tensor(&x.to_device(&dev)?).map(|v| v.as_tensor().clone())
            };
            let hc = Var::from_tensor(&h)?;
            let wc = Var::from_tensor(&w)?;
            let want = fused(hc.as_tensor(), wc.as_tensor(), &t, &s, &g, ch)?;
            let sd = LogpScore {
                zscale: s.zscale,
                bias: s.bias.to_device(&dev)?,
            };
            let got = fused(&on(&h)?, &on(&w)?, &t, &sd, &g.to_device(&dev)?, ch)?;
            compare(&format!("logp {dtype:?} cuda"), &got, &want, tol)?;
        }
    }
    Ok(())
}
