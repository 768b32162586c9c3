//! Rotary: the half tables equal `omr_model::rope`'s tables bit for bit (M-RoPE with
//! mrope_section over 3-D positions with an image; the vision 2-D rotary over merge-ordered
//! patch coordinates), and the op equals `omr_model::ops::apply_rotary` on them, in value and
//! in gradient (candle autograd through the composition).
//!
//! Tolerances (max |a−b| / max |ref|): f32 value and gradient 1e-6 (the same two products per
//! element, summed in the same order: measured 0); bf16 1e-2 against the f32 composition on the
//! same rounded inputs (one rounding of the output); CUDA vs CPU 1e-5 f32 (FMA contraction),
//! 1e-2 bf16.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{accel, check, rand};
use omr_kernels::rotary::{mrope_tables, rotary, rotary_inverse, vision_tables};
use omr_model::config::{TextConfig, VisionConfig};

fn text_cfg(head_dim: usize) -> TextConfig {
    TextConfig {
        vocab_size: 100,
        hidden_size: 4 * head_dim,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        mrope_section: vec![16, 24, 24],
        max_position_embeddings: 4096,
    }
}

/// 3-D positions of two rows of 20 tokens: text, a 2 × 3 (merged) image, text.
fn positions() -> [Vec<Vec<i64>>; 3] {
    let mut pos: [Vec<Vec<i64>>; 3] = Default::default();
    for b in 0..2i64 {
        let (mut t, mut h, mut w) = (vec![], vec![], vec![]);
        for i in 0..5 {
            t.push(i + b);
            h.push(i + b);
            w.push(i + b);
        }
        for hi in 0..2 {
            for wi in 0..3 {
                t.push(5 + b);
                h.push(5 + b + hi);
                w.push(5 + b + wi);
            }
        }
        for i in 0..9 {
            t.push(8 + b + i);
            h.push(8 + b + i);
            w.push(8 + b + i);
        }
        pos[0].push(t);
        pos[1].push(h);
        pos[2].push(w);
    }
    pos
}

/// Full (B, 1, T, D) tables as the model uses them, from half tables (B, T, D/2).
fn full(half: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[half, half], 2)?.unsqueeze(1)
}

#[test]
fn tables_equal_the_models() -> Result<()> {
    let cfg = text_cfg(128);
    let pos = positions();
    let (c, s) = mrope_tables(&pos, &cfg.mrope_section, cfg.rope_theta, 128, &Device::Cpu)?;
    let (c0, s0) = omr_model::rope::mrope_cos_sin(&pos, &cfg, &Device::Cpu)?;
    assert_eq!(
        full(&c)?.flatten_all()?.to_vec1::<f32>()?,
        c0.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(
        full(&s)?.flatten_all()?.to_vec1::<f32>()?,
        s0.flatten_all()?.to_vec1::<f32>()?
    );

    let v = VisionConfig {
        depth: 1,
        hidden_size: 1280,
        intermediate_size: 8,
        num_heads: 16,
        out_hidden_size: 8,
        patch_size: 14,
        spatial_merge_size: 2,
        temporal_patch_size: 2,
        in_channels: 3,
        window_size: Some(112),
        fullatt_block_indexes: vec![],
        tokens_per_second: 2.0,
    };
    let coords = omr_model::rope::vision_patch_coords(&[[1, 4, 6], [1, 2, 2]], 2);
    let (c, s) = vision_tables(&coords, v.head_dim(), &Device::Cpu)?;
    let (c0, s0) = omr_model::rope::vision_cos_sin(&coords, &v, &Device::Cpu)?;
    let n = coords.len();
    let as_model =
        |h: &Tensor| -> Result<Tensor> { Tensor::cat(&[h, h], 2)?.reshape((n, 1, v.head_dim())) };
    assert_eq!(
        as_model(&c)?.flatten_all()?.to_vec1::<f32>()?,
        c0.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(
        as_model(&s)?.flatten_all()?.to_vec1::<f32>()?,
        s0.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

/// y and dx through the op and through `apply_rotary` on (B, H, T, D).
fn both(x: &Var, c: &Tensor, s: &Tensor, r: &Tensor) -> Result<[Tensor; 4]> {
    let y = rotary(x.as_tensor(), c, s)?;
    let dx = (y.to_dtype(DType::F32)? * r)?
        .sum_all()?
        .backward()?
        .get(x.as_tensor())
        .expect("dx")
        .clone();
    let x32 = Var::from_tensor(&x.to_dtype(DType::F32)?)?;
    let xt = x32.as_tensor().transpose(1, 2)?;
    let y0 = omr_model::ops::apply_rotary(&xt, &full(c)?, &full(s)?)?.transpose(1, 2)?;
    let dx0 = (&y0 * r)?
        .sum_all()?
        .backward()?
        .get(x32.as_tensor())
        .expect("dx")
        .clone();
    Ok([y, dx, y0, dx0])
}

#[test]
fn matches_apply_rotary() -> Result<()> {
    let cfg = text_cfg(128);
    let (c, s) = mrope_tables(
        &positions(),
        &cfg.mrope_section,
        cfg.rope_theta,
        128,
        &Device::Cpu,
    )?;
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let x = Var::from_tensor(&rand(80, &[2, 20, 4, 128], 2.0, dtype)?)?;
        let r = rand(81, &[2, 20, 4, 128], 1.0, DType::F32)?;
        let [y, dx, y0, dx0] = both(&x, &c, &s, &r)?;
        check(&format!("rotary {dtype:?} y"), &y, &y0, tol)?;
        check(&format!("rotary {dtype:?} dx"), &dx, &dx0, tol)?;
    }
    // The inverse undoes the rotation.
    let x = rand(82, &[2, 20, 4, 128], 2.0, DType::F32)?;
    check(
        "rotary inverse ∘ rotary",
        &rotary_inverse(&rotary(&x, &c, &s)?, &c, &s)?,
        &x,
        1e-6,
    )?;
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        let cfg = text_cfg(128);
        let (c, s) = mrope_tables(
            &positions(),
            &cfg.mrope_section,
            cfg.rope_theta,
            128,
            &Device::Cpu,
        )?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let x = rand(83, &[2, 20, 28, 128], 2.0, dtype)?;
            let y = rotary(&x, &c, &s)?;
            let (cd, sd) = (c.to_device(&dev)?, s.to_device(&dev)?);
            let yd = rotary(&x.to_device(&dev)?, &cd, &sd)?;
            check(&format!("rotary {dtype:?} cuda y"), &yd, &y, tol)?;
            let dx = rotary_inverse(&y, &c, &s)?;
            let dxd = rotary_inverse(&y.to_device(&dev)?, &cd, &sd)?;
            check(&format!("rotary {dtype:?} cuda inverse"), &dxd, &dx, tol)?;
        }
    }
    Ok(())
}
