//! Fused linear cross-entropy against the unfused composition (logits = h · wᵀ, then
//! `omr_model::loss::token_nll` summed), in loss and in dH, dW (candle autograd through the
//! composition); tiles that split rows and vocabulary unevenly, and the one-vocab-tile path.
//!
//! Tolerances (max |a−b| / max |ref|): f32 loss and gradients 1e-5 (the log-sum-exp folded
//! over tiles instead of one pass); bf16 3e-2 against the f32 composition on the same rounded
//! inputs (bf16 logits tiles and bf16 dL); CUDA vs CPU 1e-4 f32 (cuBLAS vs CPU gemm order),
//! 3e-2 bf16.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{accel, bits, check, rand};
use omr_kernels::linear_ce::{linear_cross_entropy, logits_tile_products, LceChunks};

fn targets(n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect()
}

fn naive(h: &Var, w: &Var, t: &[u32]) -> Result<(Tensor, Tensor, Tensor)> {
    let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
    let loss = omr_model::loss::token_nll(&logits, t)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .sum_all()?;
    let g = loss.backward()?;
    Ok((
        loss,
        g.get(h.as_tensor()).expect("dh").clone(),
        g.get(w.as_tensor()).expect("dw").clone(),
    ))
}

fn fused(h: &Var, w: &Var, t: &[u32], ch: LceChunks) -> Result<(Tensor, Tensor, Tensor)> {
    let tt = Tensor::from_vec(t.to_vec(), t.len(), h.device())?;
    let loss = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &tt, ch)?;
    let g = loss.backward()?;
    Ok((
        loss,
        g.get(h.as_tensor()).expect("dh").clone(),
        g.get(w.as_tensor()).expect("dw").clone(),
    ))
}

#[test]
fn matches_unfused_f32() -> Result<()> {
    let (n, c, v) = (37, 48, 300);
    let h = Var::from_tensor(&rand(90, &[n, c], 1.0, DType::F32)?)?;
    let w = Var::from_tensor(&rand(91, &[v, c], 0.5, DType::F32)?)?;
    let t = targets(n, v);
    let (l0, dh0, dw0) = naive(&h, &w, &t)?;
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
        let recompute = LceChunks {
            keep_bytes: 0,
            ..ch
        };
        let (l, dh, dw) = fused(&h, &w, &t, recompute)?;
        check(&format!("lce f32 loss {recompute:?}"), &l, &l0, 1e-5)?;
        check(&format!("lce f32 dh {recompute:?}"), &dh, &dh0, 1e-5)?;
        check(&format!("lce f32 dw {recompute:?}"), &dw, &dw0, 1e-5)?;
        let (l, dh, dw) = fused(&h, &w, &t, ch)?;
        check(&format!("lce f32 loss {ch:?}"), &l, &l0, 1e-5)?;
        check(&format!("lce f32 dh {ch:?}"), &dh, &dh0, 1e-5)?;
        check(&format!("lce f32 dw {ch:?}"), &dw, &dw0, 1e-5)?;
    }
    // Without a tracked input the op returns the loss alone.
    let tt = Tensor::from_vec(t.clone(), n, &Device::Cpu)?;
    let l = linear_cross_entropy(
        &h.as_tensor().detach(),
        &w.as_tensor().detach(),
        &tt,
        LceChunks::default(),
    )?;
    check("lce f32 loss (no grad)", &l, &l0, 1e-5)?;
    Ok(())
}

#[test]
fn frozen_inputs_get_no_gradient() -> Result<()> {
    // A frozen lm head (LoRA) or frozen hidden states: only the tracked side's gradient is
    // computed, equal to the full op's, and the untracked side gets none.
    let (n, c, v) = (21, 32, 200);
    let h = Var::from_tensor(&rand(96, &[n, c], 1.0, DType::F32)?)?;
    let w = Var::from_tensor(&rand(97, &[v, c], 0.5, DType::F32)?)?;
    let t = targets(n, v);
    let (l0, dh0, dw0) = naive(&h, &w, &t)?;
    let tt = Tensor::from_vec(t, n, &Device::Cpu)?;
    let ch = LceChunks {
        rows: 8,
        vocab: 64,
        ..LceChunks::default()
    };
    let frozen_w = w.as_tensor().detach();
    let l = linear_cross_entropy(h.as_tensor(), &frozen_w, &tt, ch)?;
    let g = l.backward()?;
    check("lce frozen w loss", &l, &l0, 1e-5)?;
    check(
        "lce frozen w dh",
        g.get(h.as_tensor()).expect("dh"),
        &dh0,
        1e-5,
    )?;
    assert!(g.get(&frozen_w).is_none(), "a frozen head gets no gradient");
    let frozen_h = h.as_tensor().detach();
    let l = linear_cross_entropy(&frozen_h, w.as_tensor(), &tt, ch)?;
    let g = l.backward()?;
    check(
        "lce frozen h dw",
        g.get(w.as_tensor()).expect("dw"),
        &dw0,
        1e-5,
    )?;
    assert!(
        g.get(&frozen_h).is_none(),
        "frozen hidden states get no gradient"
    );
    Ok(())
}

#[test]
fn bf16_close_to_f32() -> Result<()> {
    let (n, c, v) = (40, 64, 500);
    let h = Var::from_tensor(&rand(92, &[n, c], 1.0, DType::BF16)?)?;
    let w = Var::from_tensor(&rand(93, &[v, c], 0.5, DType::BF16)?)?;
    let t = targets(n, v);
    let h32 = Var::from_tensor(&h.to_dtype(DType::F32)?)?;
    let w32 = Var::from_tensor(&w.to_dtype(DType::F32)?)?;
    let (l0, dh0, dw0) = naive(&h32, &w32, &t)?;
    // Several row chunks (dW summed in f32), and one (dW kept in bf16 as the products give it).
    for rows in [16, 64] {
        let ch = LceChunks {
            rows,
            vocab: 128,
            ..LceChunks::default()
        };
        let (l, dh, dw) = fused(&h, &w, &t, ch)?;
        check(&format!("lce bf16 loss, rows {rows}"), &l, &l0, 3e-2)?;
        check(&format!("lce bf16 dh, rows {rows}"), &dh, &dh0, 3e-2)?;
        check(&format!("lce bf16 dw, rows {rows}"), &dw, &dw0, 3e-2)?;
        assert_eq!(dw.dtype(), DType::BF16);
    }
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
            let h = rand(94, &[n, c], 1.0, dtype)?;
            let w = rand(95, &[v, c], 0.2, dtype)?;
            let (l, dh, dw) = fused(&Var::from_tensor(&h)?, &Var::from_tensor(&w)?, &t, ch)?;
            let (ld, dhd, dwd) = fused(
                &Var::from_tensor(&h.to_device(&dev)?)?,
                &Var::from_tensor(&w.to_device(&dev)?)?,
                &t,
                ch,
            )?;
            check(&format!("lce {dtype:?} cuda loss"), &ld, &l, tol)?;
            check(&format!("lce {dtype:?} cuda dh"), &dhd, &dh, tol)?;
            check(&format!("lce {dtype:?} cuda dw"), &dwd, &dw, tol)?;
        }
    }
    Ok(())
}

/// Keeping a row chunk's logits tiles for the gradient pass gives the bits that computing them
/// again gives (the same products), over several row and vocab blocks, a ragged last block of
/// each, f32 and bf16; and the budget decides: a chunk whose tiles exceed it recomputes.
#[test]
fn kept_tiles_equal_recomputed() -> Result<()> {
    let ch = LceChunks {
        rows: 16,
        vocab: 64,
        ..LceChunks::default()
    };
    assert!(ch.keeps_tiles(16, 300, 4));
    assert!(!LceChunks {
        keep_bytes: 16 * 300 * 4 - 1,
        ..ch
    }
    .keeps_tiles(16, 300, 4));
    assert!(
        LceChunks {
            keep_bytes: 0,
            ..ch
        }
        .keeps_tiles(16, 64, 4),
        "one block: kept"
    );
    for dtype in [DType::F32, DType::BF16] {
        let (n, c, v) = (37, 48, 300);
        let h = Var::from_tensor(&rand(98, &[n, c], 1.0, dtype)?)?;
        let w = Var::from_tensor(&rand(99, &[v, c], 0.5, dtype)?)?;
        let t = targets(n, v);
        // 3 row chunks × 5 vocab blocks: 15 tile products kept, 30 recomputed.
        let before = logits_tile_products();
        let kept = fused(&h, &w, &t, ch)?;
        assert_eq!(logits_tile_products() - before, 15);
        let before = logits_tile_products();
        let again = fused(
            &h,
            &w,
            &t,
            LceChunks {
                keep_bytes: 0,
                ..ch
            },
        )?;
        assert_eq!(logits_tile_products() - before, 30);
        for (name, a, b) in [
            ("loss", &kept.0, &again.0),
            ("dh", &kept.1, &again.1),
            ("dw", &kept.2, &again.2),
        ] {
            let same = bits(&a.to_dtype(DType::F32)?)? == bits(&b.to_dtype(DType::F32)?)?;
            assert!(same, "{dtype:?} {name}: kept tiles differ from recomputed");
        }
    }
    Ok(())
}

/// The backward scales the gradients the forward made by the loss's incoming gradient (the
/// scalar rounded to their dtype, then one product: candle's `broadcast_mul` bit for bit),
/// hands them over once and keeps nothing: a second backward through the same graph is an
/// error, not gradients silently missing.
#[test]
fn backward_scales_once() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let (n, c, v) = (24, 32, 200);
        let h = Var::from_tensor(&rand(96, &[n, c], 1.0, dtype)?)?;
        let w = Var::from_tensor(&rand(97, &[v, c], 0.5, dtype)?)?;
        let t = targets(n, v);
        let tt = Tensor::from_vec(t.clone(), n, &Device::Cpu)?;
        let ch = LceChunks {
            rows: 16,
            vocab: 64,
            ..LceChunks::default()
        };
        let (_, dh1, dw1) = fused(&h, &w, &t, ch)?;
        let loss = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &tt, ch)?;
        let scaled = (&loss * 0.37)?;
        let g = scaled.backward()?;
        let k = Tensor::new(0.37f32, &Device::Cpu)?.to_dtype(dtype)?;
        for (name, got, one) in [
            ("dh", g.get(h.as_tensor()).expect("dh"), &dh1),
            ("dw", g.get(w.as_tensor()).expect("dw"), &dw1),
        ] {
            let want = one.broadcast_mul(&k)?;
            let same = bits(&got.to_dtype(DType::F32)?)? == bits(&want.to_dtype(DType::F32)?)?;
            assert!(
                same,
                "{dtype:?} {name}: not 0.37 · the loss's gradient, bit for bit"
            );
        }
        let again = scaled.backward().expect_err("a second backward must fail");
        assert!(
            again.to_string().contains("earlier backward"),
            "unexpected error: {again}"
        );
    }
    Ok(())
}
