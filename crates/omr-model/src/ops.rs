//! Differentiable building blocks, each made only of candle ops that have a backward
//! (CANDLE.md §1: candle_nn's fast softmax/rms_norm/layer_norm/rope record no backward), and
//! [`attach_grad`], which lets a frozen weight take part in a tracked computation without
//! candle computing (and keeping) a gradient for it (CANDLE.md §5).
//!
//! Norms and softmax run in f32 whatever the compute dtype, as transformers does.

mod attach;
mod fused_attn;
mod fused_linear;
mod fused_mlp;
#[cfg(test)]
mod test_values;

pub use attach::{attach_grad, attach_grad2, attach_grad3, attach_sum2, attach_sum3};
pub(crate) use fused_attn::{attn_half, attn_params};
pub use fused_attn::{decoder_attention, AttnWeights, Proj, Qkv};
pub use fused_linear::{linear_op, linear_op_to, linear_residual};
pub use fused_mlp::{decoder_mlp, swiglu_mlp, swiglu_mlp_residual, MlpWeights};
pub(crate) use fused_mlp::{mlp_half, mlp_params, HalfGrads};

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension, in f32 for bf16/f16 input (cast back after). The max is
/// detached: softmax is shift invariant, so the gradient is the same, and the reduction's own
/// backward is skipped.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        return softmax_last(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Qwen2RMSNorm: `w · x / sqrt(mean(x²) + eps)`, computed in f32, cast back before the weight
/// (as transformers does: `weight * hidden_states.to(input_dtype)`).
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = xf.broadcast_mul(&r)?.to_dtype(dtype)?;
    normed.broadcast_mul(w)
}

/// torch.nn.LayerNorm over the last dimension, in f32.
pub fn layernorm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (var + eps)?.sqrt()?.recip()?;
    let normed = centered.broadcast_mul(&r)?.to_dtype(dtype)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// QuickGELU of CLIP/Qwen2-VL: `x · sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x.mul(&s)
}

/// `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x·cos + rotate_half(x)·sin` with cos/sin broadcast against x.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .broadcast_add(&rotate_half(x)?.broadcast_mul(sin)?)
}

/// `x @ wᵀ (+ b)` for a frozen `w`/`b` (plain tensors, not variables): the value is computed
/// without a graph and attached to `x` with a backward that only computes `dL/dx = g @ w`.
/// A plain matmul would make candle also compute `xᵀ @ g` for `w` and keep it.
/// x: (…, I), w: (O, I) → (…, O)
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !x.track_op() {
        return linear(&x.detach(), w, b);
    }
    // linear_op's op with nothing but x tracked: its backward is `g @ w` alone, and it keeps
    // w, not x.
    linear_op(x, &w.detach(), b.map(|b| b.detach()).as_ref())
}

/// `x @ wᵀ (+ b)` through candle's own ops (both gradients), for trainable weights.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = matmul_t(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x @ wᵀ` with x flattened to 2-D, which keeps candle's matmul (and its backward) on one
/// gemm instead of a broadcast batch. x: (…, I), w: (O, I) → (…, O)
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let i = *dims.last().expect("matmul input has a last dimension");
    let rows = x.elem_count() / i.max(1);
    let y = x.reshape((rows, i))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

/// `g @ w` for g: (…, O), w: (O, I) → (…, I).
pub fn matmul_nt(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = g.dims().to_vec();
    let o = *dims.last().expect("grad has a last dimension");
    let rows = g.elem_count() / o.max(1);
    let y = g.reshape((rows, o))?.matmul(w)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(1)?;
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_gives_input_grad_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &dev)?;
        let w = Tensor::from_vec(vec![0.5f32, -1., 2., 1., 0., -0.5], (2, 3), &dev)?;
        let b = Tensor::from_vec(vec![0.1f32, -0.2], 2, &dev)?;
        let y = frozen_linear(x.as_tensor(), &w, Some(&b))?;
        let y_ref = x.as_tensor().matmul(&w.t()?)?.broadcast_add(&b)?;
        assert_eq!(y.to_vec2::<f32>()?, y_ref.to_vec2::<f32>()?);
        let grads = (y.sqr()?.sum_all()?).backward()?;
        let gx = grads.get(x.as_tensor()).expect("x has a grad");
        let grads_ref = (y_ref.sqr()?.sum_all()?).backward()?;
        let gx_ref = grads_ref.get(x.as_tensor()).expect("x has a grad");
        assert_eq!(gx.to_vec2::<f32>()?, gx_ref.to_vec2::<f32>()?);
        assert!(
            grads.get(&w).is_none(),
            "no gradient is kept for the frozen weight"
        );
        Ok(())
    }

    #[test]
    fn softmax_matches_candle_nn() -> Result<()> {
        let x = Tensor::from_vec(vec![1f32, 2., 3., -1., 0., 10.], (2, 3), &Device::Cpu)?;
        let a = softmax_last(&x)?.to_vec2::<f32>()?;
        let b = candle_nn::ops::softmax_last_dim(&x)?.to_vec2::<f32>()?; // no-grad ok: reference value
        for (ra, rb) in a.iter().zip(&b) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() < 1e-6);
            }
        }
        Ok(())
    }
}
