//! RMSNorm: the fused op against `omr_model::ops::rmsnorm` (a composition of candle ops) in
//! value and in gradients (candle autograd through the composition), f32 and bf16; then CUDA
//! against the CPU reference where a CUDA device exists.
//!
//! Tolerances (max |a−b| / max |ref|): f32 forward and gradients 1e-5 (sum order is the only
//! difference); bf16 forward 1e-2 (one bf16 rounding of the output is 3.9e-3 relative) and bf16
//! gradients against f32 reference gradients on the same rounded inputs 1e-2.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{accel, check, rand};
use omr_kernels::rmsnorm;

const EPS: f64 = 1e-6;

fn grads(x: &Var, w: &Var, r: &Tensor, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let y = if fused {
        rmsnorm::rmsnorm(x.as_tensor(), w.as_tensor(), EPS)?
    } else {
        omr_model::ops::rmsnorm(x.as_tensor(), w.as_tensor(), EPS)?
    };
    let g = (y.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
    Ok((
        y,
        g.get(x.as_tensor()).expect("dx").clone(),
        g.get(w.as_tensor()).expect("dw").clone(),
    ))
}

#[test]
fn matches_candle_composition_f32() -> Result<()> {
    let x = Var::from_tensor(&rand(1, &[3, 7, 96], 2.0, DType::F32)?)?;
    let w = Var::from_tensor(&(rand(2, &[96], 0.5, DType::F32)? + 1.0)?)?;
    let r = rand(3, &[3, 7, 96], 1.0, DType::F32)?;
    let (y, dx, dw) = grads(&x, &w, &r, true)?;
    let (y0, dx0, dw0) = grads(&x, &w, &r, false)?;
    check("rmsnorm f32 y", &y, &y0, 1e-5)?;
    check("rmsnorm f32 dx", &dx, &dx0, 1e-5)?;
    check("rmsnorm f32 dw", &dw, &dw0, 1e-5)?;
    Ok(())
}

#[test]
fn bf16_close_to_f32_reference() -> Result<()> {
    let x32 = rand(4, &[5, 128], 3.0, DType::F32)?;
    let w32 = (rand(5, &[128], 0.5, DType::F32)? + 1.0)?;
    let r = rand(6, &[5, 128], 1.0, DType::F32)?;
    let x = Var::from_tensor(&x32.to_dtype(DType::BF16)?)?;
    let w = Var::from_tensor(&w32.to_dtype(DType::BF16)?)?;
    let (y, dx, dw) = grads(&x, &w, &r, true)?;
    // The bf16 composition (same roundings as the model) for the forward...
    let y_comp = omr_model::ops::rmsnorm(x.as_tensor(), w.as_tensor(), EPS)?;
    check("rmsnorm bf16 y vs bf16 composition", &y, &y_comp, 1e-2)?;
    // ...and f32 autograd on the same (bf16-rounded) inputs for the gradients.
    let x0 = Var::from_tensor(&x.to_dtype(DType::F32)?)?;
    let w0 = Var::from_tensor(&w.to_dtype(DType::F32)?)?;
    let (_, dx0, dw0) = grads(&x0, &w0, &r, false)?;
    check("rmsnorm bf16 dx", &dx, &dx0, 1e-2)?;
    check("rmsnorm bf16 dw", &dw, &dw0, 1e-2)?;
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            // C = 3584 (Qwen2.5-VL-7B's hidden size) over 67 rows, more rows than one block.
            let x = rand(7, &[67, 3584], 2.0, dtype)?;
            let w = (rand(8, &[3584], 0.5, DType::F32)? + 1.0)?.to_dtype(dtype)?;
            let dy = rand(9, &[67, 3584], 1.0, dtype)?;
            let y = rmsnorm::rmsnorm(&x, &w, EPS)?;
            let yd = rmsnorm::rmsnorm(&x.to_device(&dev)?, &w.to_device(&dev)?, EPS)?;
            check(&format!("rmsnorm {dtype:?} cuda y"), &yd, &y, tol)?;
            let (dx, dw) = rmsnorm::backward(&x, &w, &dy, EPS)?;
            let (dxd, dwd) = rmsnorm::backward(
                &x.to_device(&dev)?,
                &w.to_device(&dev)?,
                &dy.to_device(&dev)?,
                EPS,
            )?;
            check(&format!("rmsnorm {dtype:?} cuda dx"), &dxd, &dx, tol)?;
            check(&format!("rmsnorm {dtype:?} cuda dw"), &dwd, &dw, tol)?;
        }
    }
    Ok(())
}
