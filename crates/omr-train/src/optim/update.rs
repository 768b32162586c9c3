//! One parameter's AdamW update and the global gradient norm, each two ways: plain candle ops
//! (the reference; about ten allocating elementwise ops per parameter, any device) and the
//! fused ops of omr-kernels (`adamw_step`: one CUDA kernel per parameter; `global_grad_norm`:
//! two launches for the whole model). [`super::AdamW::set_fused`] picks one.
//!
//! Both read the same [`AdamWHyper`], and `adamw_step` makes its f32 constants from it exactly
//! as candle's `affine(mul, add)` casts its f64 arguments, then runs the same f32 operations in
//! the same order: on the CPU the two paths give the same bits, weights, moments and norm
//! (tests/optim_fused.rs). On CUDA they need not: candle's affine kernel is built with nvcc's
//! default FMA contraction, so the candle path's denominator `sqrt(v)·c + eps` is one fused
//! multiply-add there, while the fused kernel rounds product and sum separately (as the CPU
//! does). On a GPU the fused path is the one that matches the CPU reference; the candle path
//! can differ from it in the last bit of the denominator. The CUDA norm sums in another order
//! than the CPU one (both f64), so it agrees to f64 rounding, not bit for bit.

use candle_core::{DType, Tensor};
use omr_kernels::AdamWHyper;

use super::Result;

/// (p', m', v') by candle ops. `g = None` is a zero gradient.
pub(super) fn candle_update(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    h: &AdamWHyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = h.step.min(i32::MAX as u64) as i32;
    let bias1 = 1.0 - h.beta1.powi(t);
    let bias2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
    let g = match g {
        Some(g) => g.to_dtype(DType::F32)?.affine(h.grad_coef, 0.0)?,
        None => m.zeros_like()?,
    };
    let m = (m.affine(h.beta1, 0.0)? + g.affine(1.0 - h.beta1, 0.0)?)?;
    let v = (v.affine(h.beta2, 0.0)? + g.sqr()?.affine(1.0 - h.beta2, 0.0)?)?;
    let p = p.affine(1.0 - h.lr * h.weight_decay, 0.0)?;
    let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, h.eps)?;
    let p = (p - m.div(&denom)?.affine(h.lr / bias1, 0.0)?)?;
    Ok((p, m, v))
}

/// (p', m', v') by omr-kernels' `adamw_step`. The bf16 copy it also writes is dropped: the
/// trainable `Var`s are the f32 masters and nothing reads a bf16 copy yet.
pub(super) fn fused_update(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    h: &AdamWHyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    let out = omr_kernels::adamw_step(p, m, v, g, h)?;
    Ok((out.p, out.m, out.v))
}

/// sqrt of the sum of squares of every gradient by candle ops, accumulated in f64 in
/// parameter order.
pub(super) fn candle_norm(sums: &[Option<Tensor>]) -> Result<f64> {
    let mut parts = Vec::with_capacity(sums.len());
    for g in sums.iter().flatten() {
        parts.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
    }
    if parts.is_empty() {
        return Ok(0.0);
    }
    // One device sync for the whole model; the stacked sum runs in order on the CPU.
    let per_param: Vec<f64> = Tensor::stack(&parts, 0)?.to_vec1()?;
    Ok(per_param.iter().sum::<f64>().sqrt())
}

/// The same norm by omr-kernels' `global_grad_norm` (one device sync).
pub(super) fn fused_norm(sums: &[Option<Tensor>]) -> Result<f64> {
    // One kernel call per gradient dtype (bf16 on compute copies, f32 on masters and sums).
    let mut norms = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let grads: Vec<Tensor> = sums
            .iter()
            .flatten()
            .filter(|g| g.dtype() == dtype)
            .cloned()
            .collect();
        if !grads.is_empty() {
            norms.push(omr_kernels::global_grad_norm(&grads)?.to_scalar::<f64>()?);
        }
    }
    Ok(match norms.as_slice() {
        [n] => *n,
        all => all.iter().map(|n| n * n).sum::<f64>().sqrt(),
    })
}
