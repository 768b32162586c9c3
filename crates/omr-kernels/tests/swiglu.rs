//! SwiGLU: the fused op against `silu(g) · u` composed of candle ops, in value and gradients
//! (candle autograd), f32 and bf16; CUDA against the CPU reference where a device exists.
//!
//! Tolerances (max |a−b| / max |ref|): f32 1e-5 (the exp and one reordering); bf16 1e-2 for
//! the value against the bf16 composition (which rounds silu(g) before the product; the op
//! rounds once) and for the gradients against f32 autograd on the same rounded inputs.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{accel, check, rand};
use omr_kernels::swiglu;

fn run(g: &Var, u: &Var, r: &Tensor, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let y = if fused {
        swiglu::swiglu(g.as_tensor(), u.as_tensor())?
    } else {
        (g.as_tensor().silu()? * u.as_tensor())?
    };
    let gr = (y.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
    Ok((
        y,
        gr.get(g.as_tensor()).expect("dg").clone(),
        gr.get(u.as_tensor()).expect("du").clone(),
    ))
}

#[test]
fn matches_candle_composition() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let g = Var::from_tensor(&rand(11, &[4, 9, 160], 6.0, dtype)?)?;
        let u = Var::from_tensor(&rand(12, &[4, 9, 160], 2.0, dtype)?)?;
        let r = rand(13, &[4, 9, 160], 1.0, DType::F32)?;
        let (y, dg, du) = run(&g, &u, &r, true)?;
        // The value against the composition in the same dtype; the gradients against f32
        // autograd on the same (rounded) inputs, since a bf16 autograd rounds every step.
        let (y0, _, _) = run(&g, &u, &r, false)?;
        let g32 = Var::from_tensor(&g.to_dtype(DType::F32)?)?;
        let u32_ = Var::from_tensor(&u.to_dtype(DType::F32)?)?;
        let (_, dg0, du0) = run(&g32, &u32_, &r, false)?;
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        check(&format!("swiglu {dtype:?} y"), &y, &y0, tol)?;
        check(&format!("swiglu {dtype:?} dg"), &dg, &dg0, tol)?;
        check(&format!("swiglu {dtype:?} du"), &du, &du0, tol)?;
    }
    Ok(())
}

/// Every element's bits (as f32: exact for bf16 too).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// `backward_with_act` on the CPU: dg and du are `backward`'s bits and the activation is the
/// forward's, for both dtypes, with dy given in another shape of the same size (the decoder
/// MLP hands it over as (rows, I)).
#[test]
fn backward_with_act_is_backward_and_forward() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let g = rand(21, &[3, 5, 72], 6.0, dtype)?;
        let u = rand(22, &[3, 5, 72], 2.0, dtype)?;
        let dy = rand(23, &[15, 72], 1.0, dtype)?;
        let (dg, du) = swiglu::backward(&g, &u, &dy)?;
        let (dga, dua, y) = swiglu::backward_with_act(&g, &u, &dy)?;
        assert_eq!(bits(&dga)?, bits(&dg)?, "{dtype:?} dg");
        assert_eq!(bits(&dua)?, bits(&du)?, "{dtype:?} du");
        assert_eq!(bits(&y)?, bits(&swiglu::swiglu(&g, &u)?)?, "{dtype:?} y");
        assert_eq!(y.dims(), g.dims());
    }
    // Sizes that do not fit are an error, not a panic.
    let g = rand(24, &[4, 8], 1.0, DType::F32)?;
    assert!(swiglu::backward_with_act(&g, &g, &rand(25, &[4, 7], 1.0, DType::F32)?).is_err());
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let g = rand(14, &[33, 18944], 6.0, dtype)?;
            let u = rand(15, &[33, 18944], 2.0, dtype)?;
            let dy = rand(16, &[33, 18944], 1.0, dtype)?;
            let y = swiglu::swiglu(&g, &u)?;
            let yd = swiglu::swiglu(&g.to_device(&dev)?, &u.to_device(&dev)?)?;
            check(&format!("swiglu {dtype:?} cuda y"), &yd, &y, tol)?;
            let (dg, du) = swiglu::backward(&g, &u, &dy)?;
            let (dgd, dud) = swiglu::backward(
                &g.to_device(&dev)?,
                &u.to_device(&dev)?,
                &dy.to_device(&dev)?,
            )?;
            check(&format!("swiglu {dtype:?} cuda dg"), &dgd, &dg, tol)?;
            check(&format!("swiglu {dtype:?} cuda du"), &dud, &du, tol)?;
            // The variant that also writes the activation: the same dg, du bits as the plain
            // backward's kernel, y the forward kernel's bits.
            let (dga, dua, ya) = swiglu::backward_with_act(
                &g.to_device(&dev)?,
                &u.to_device(&dev)?,
                &dy.to_device(&dev)?,
            )?;
            assert_eq!(bits(&dga)?, bits(&dgd)?, "swiglu {dtype:?} cuda act dg");
            assert_eq!(bits(&dua)?, bits(&dud)?, "swiglu {dtype:?} cuda act du");
            assert_eq!(bits(&ya)?, bits(&yd)?, "swiglu {dtype:?} cuda act y");
        }
    }
    Ok(())
}
